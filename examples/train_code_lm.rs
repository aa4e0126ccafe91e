//! The course's story end to end, in Rust: train a small BPE tokenizer and a tiny causal LM on
//! real Python source, twice from one command (keyword-weighted and unweighted, same seed, data
//! and steps), and compare next-token accuracy on keyword targets vs all targets on held-out
//! files.
//!
//! ```sh
//! cargo run --release --features train-example --example train_code_lm            # CPU
//! cargo run --release --features train-example,candle-cuda --example train_code_lm # GPU if present
//! ```
//!
//! Default corpus: the Python standard library that `python3` reports (`--corpus DIR` to choose).
//! Keywords: the course's `plt`, `pd`, `sk`, `fit`, `predict` and their space-prefixed forms,
//! whichever the trained tokenizer holds as single tokens (`--keywords` to choose others).
//!
//! `--loss-path linear` trains through `candle::weighted_linear_loss` (the logits are never built;
//! gradients of the head and of the last hidden states come from the fused op) instead of
//! `lm_head` + `candle::weighted_loss`; `--tie-embeddings` makes the head the token embedding.

use candle_core::{DType, Device, IndexOp, Module, Shape, Tensor, Var, D};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::builder::TypedValueParser as _;
use clap::Parser;
use fused_weighted_loss::candle::{weighted_linear_loss, weighted_loss};
use fused_weighted_loss::synthetic::Rng;
use fused_weighted_loss::LossSpec;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, PostProcessorWrapper, TokenizerBuilder};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser, Debug, Clone)]
#[command(about = "Keyword-weighted vs unweighted training of a tiny code LM (the course's example)")]
struct Args {
    /// Folder of Python files; repeat to mix several (default: the standard library of `python3`).
    #[arg(long)]
    corpus: Vec<PathBuf>,
    /// Bytes of source to read at most (files in a seeded random order).
    #[arg(long, default_value_t = 6_000_000)]
    max_bytes: usize,
    /// BPE vocabulary size.
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
    /// Training steps per run (at least 1).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    steps: usize,
    /// Sequences per batch (at least 1).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    batch: usize,
    /// Tokens per sequence (at least 2: position t predicts token t + 1).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(2..).map(|n| n as usize))]
    seq: usize,
    /// Model width (a multiple of --heads).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    dim: usize,
    /// Transformer layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Attention heads (at least 1).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    heads: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// The loss weighting's alpha.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// Keyword strings (comma-separated; those that are single tokens are used).
    #[arg(long, value_delimiter = ',', default_value = "plt,pd,sk,fit,predict")]
    keywords: Vec<String>,
    /// Use only the keywords the BPE learned as single tokens (by default they are added).
    #[arg(long)]
    learned_keywords_only: bool,
    /// Seed for the initial weights, the file order and the batches (both runs use it; equal
    /// seeds give equal runs).
    #[arg(long, default_value_t = 17)]
    seed: u64,
    /// How the loss is computed: `logits` (lm_head, then the loss on the logits) or `linear`
    /// (the fused linear + weighted loss from the last hidden states; no logits); `both` trains
    /// the weighted model through each, from the same initial weights, to compare the curves.
    #[arg(long, default_value = "logits", value_parser = ["logits", "linear", "both"])]
    loss_path: String,
    /// Use the token embedding as the output head (no head bias).
    #[arg(long)]
    tie_embeddings: bool,
}

/// Python files under `dirs` (UTF-8 text only), in a seeded random order, up to `max_bytes` of
/// source.
fn python_files(dirs: &[PathBuf], max_bytes: usize, seed: u64) -> Res<Vec<PathBuf>> {
    let mut all = Vec::new();
    let mut stack = dirs.to_vec();
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            // (the entry's own type: a link to a folder is not followed, so no folder is read twice
            // and a link to a parent cannot loop)
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && !name.starts_with('.') && name != "site-packages" && name != "__pycache__" {
                stack.push(p);
            } else if name.ends_with(".py") {
                all.push(p);
            }
        }
    }
    all.sort();
    let mut rng = Rng::new(seed);
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let (mut out, mut total) = (Vec::new(), 0usize);
    for p in all {
        let len = std::fs::metadata(&p).map(|m| m.len() as usize).unwrap_or(0);
        if len == 0 || len > 400_000 {
            continue;
        }
        if total + len > max_bytes {
            break;
        }
        // the tokenizer's trainer reads text: a file in another encoding (the standard library's
        // test/ folder holds latin-1 and koi8-r ones) failed the whole run
        if !std::fs::read(&p).is_ok_and(|b| std::str::from_utf8(&b).is_ok()) {
            continue;
        }
        total += len;
        out.push(p);
    }
    if out.is_empty() {
        return Err(format!("no Python files under {dirs:?}").into());
    }
    Ok(out)
}

fn default_corpus() -> Res<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .output()
        .map_err(|e| format!("running python3 to find its standard library: {e} (pass --corpus DIR)"))?;
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// One pre-norm transformer block with causal self-attention.
struct Block {
    ln1: candle_nn::LayerNorm,
    qkv: candle_nn::Linear,
    proj: candle_nn::Linear,
    ln2: candle_nn::LayerNorm,
    up: candle_nn::Linear,
    down: candle_nn::Linear,
    heads: usize,
}

impl Block {
    fn new(vb: VarBuilder, dim: usize, heads: usize) -> candle_core::Result<Self> {
        Ok(Block {
            ln1: candle_nn::layer_norm(dim, 1e-5, vb.pp("ln1"))?,
            qkv: candle_nn::linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("proj"))?,
            ln2: candle_nn::layer_norm(dim, 1e-5, vb.pp("ln2"))?,
            up: candle_nn::linear(dim, 4 * dim, vb.pp("up"))?,
            down: candle_nn::linear(4 * dim, dim, vb.pp("down"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let dh = d / self.heads;
        let qkv = self.qkv.forward(&self.ln1.forward(x)?)?.reshape((b, t, 3, self.heads, dh))?;
        let q = qkv.i((.., .., 0))?.transpose(1, 2)?.contiguous()?;
        let k = qkv.i((.., .., 1))?.transpose(1, 2)?.contiguous()?;
        let v = qkv.i((.., .., 2))?.transpose(1, 2)?.contiguous()?;
        let att = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?.broadcast_add(mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let x = (x + self.proj.forward(&y)?)?;
        let h = self.down.forward(&self.up.forward(&self.ln2.forward(&x)?)?.gelu()?)?;
        x + h
    }
}

/// A tiny GPT: token + position embeddings, blocks, final norm, LM head.
struct Model {
    tok: candle_nn::Embedding,
    pos: candle_nn::Embedding,
    blocks: Vec<Block>,
    ln: candle_nn::LayerNorm,
    head: candle_nn::Linear,
    mask: Tensor,
}

impl Model {
    fn new(vb: VarBuilder, a: &Args, vocab: usize, device: &Device) -> candle_core::Result<Self> {
        let blocks =
            (0..a.layers).map(|i| Block::new(vb.pp(format!("block{i}")), a.dim, a.heads)).collect::<Result<_, _>>()?;
        let t = a.seq;
        let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let tok = candle_nn::embedding(vocab, a.dim, vb.pp("tok"))?;
        let head = if a.tie_embeddings {
            candle_nn::Linear::new(tok.embeddings().clone(), None)
        } else {
            candle_nn::linear(a.dim, vocab, vb.pp("head"))?
        };
        Ok(Model {
            tok,
            pos: candle_nn::embedding(t, a.dim, vb.pp("pos"))?,
            blocks,
            ln: candle_nn::layer_norm(a.dim, 1e-5, vb.pp("ln"))?,
            head,
            mask: Tensor::from_vec(mask, (t, t), device)?,
        })
    }

    /// The last hidden states `[B, T, D]` (after the final norm) for ids `[B, T]`.
    fn hidden(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let positions = Tensor::arange(0u32, t as u32, ids.device())?;
        let mut x = self.tok.forward(ids)?.broadcast_add(&self.pos.forward(&positions)?)?;
        for b in &self.blocks {
            x = b.forward(&x, &self.mask)?;
        }
        self.ln.forward(&x)
    }

    /// Logits `[B, T, V]` for ids `[B, T]`.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(&self.hidden(ids)?)
    }

    /// The weighted loss of a batch, through the logits or the fused linear op.
    fn loss(&self, ids: &Tensor, spec: &LossSpec, fused_linear: bool) -> candle_core::Result<Tensor> {
        if fused_linear {
            let h = self.hidden(ids)?;
            weighted_linear_loss(&h, self.head.weight(), self.head.bias(), ids, None, spec)
        } else {
            weighted_loss(&self.forward(ids)?, ids, None, spec)
        }
    }
}

/// `n` windows of `len` tokens from `stream`, at positions drawn from `rng`.
fn windows(stream: &[u32], n: usize, len: usize, rng: &mut Rng) -> Vec<u32> {
    let mut out = Vec::with_capacity(n * len);
    for _ in 0..n {
        let start = rng.below((stream.len() - len) as u64) as usize;
        out.extend_from_slice(&stream[start..start + len]);
    }
    out
}

/// What one training run reports.
struct RunReport {
    name: &'static str,
    curve: Vec<(usize, f64)>,
    tokens_per_s: f64,
    ms_per_step: f64,
    acc_all: f64,
    acc_kw: Option<f64>,
    kw_targets: usize,
}

/// The model's variables drawn from `--seed` (candle's own initialisers draw from an unseeded
/// generator): each from a generator seeded by the seed and the variable's name, with the
/// distribution candle's hint asks for, so that every run of every invocation with one seed
/// starts from the same weights.
struct SeededInit {
    vars: VarMap,
    seed: u64,
}

impl SeededInit {
    fn values(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        // FNV-1a of the name, mixed with the seed
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let mut rng = Rng::new(self.seed ^ h);
        let n = shape.elem_count();
        let uniform = |rng: &mut Rng, lo: f64, up: f64| (lo + (up - lo) * rng.unit()) as f32;
        // Box-Muller: (0, 1] keeps the logarithm finite
        let normal = |rng: &mut Rng, mean: f64, std: f64| {
            let (u, v) = (1.0 - rng.unit(), rng.unit());
            (mean + std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        };
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => (0..n).map(|_| uniform(&mut rng, lo, up)).collect(),
            Init::Randn { mean, stdev } => (0..n).map(|_| normal(&mut rng, mean, stdev)).collect(),
            Init::Kaiming { dist, fan, non_linearity } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n).map(|_| uniform(&mut rng, -bound, bound)).collect()
                    }
                    NormalOrUniform::Normal => (0..n).map(|_| normal(&mut rng, 0.0, std)).collect(),
                }
            }
        }
    }
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut vars = self.vars.data().lock().map_err(|_| candle_core::Error::Msg("poisoned VarMap".into()))?;
        if let Some(v) = vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!("variable {name}: shape {:?}, asked for {s:?}", v.shape());
            }
            return v.to_dtype(dtype);
        }
        let t = Tensor::from_vec(self.values(&s, name, h), s, dev)?.to_dtype(dtype)?;
        let v = Var::from_tensor(&t)?;
        vars.insert(name.to_string(), v.clone());
        Ok(v.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let vars = self.vars.data().lock().map_err(|_| candle_core::Error::Msg("poisoned VarMap".into()))?;
        match vars.get(name) {
            Some(v) => v.to_dtype(dtype),
            None => candle_core::bail!("no variable {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.data().lock().is_ok_and(|v| v.contains_key(name))
    }
}

#[allow(clippy::too_many_arguments)]
fn train(
    name: &'static str,
    fused_linear: bool,
    a: &Args,
    spec: &LossSpec,
    train_ids: &[u32],
    heldout: &[u32],
    vocab: usize,
    keywords: &[u32],
    device: &Device,
) -> Res<RunReport> {
    let varmap = VarMap::new();
    let init = SeededInit { vars: varmap.clone(), seed: a.seed };
    let vb = VarBuilder::from_backend(Box::new(init), DType::F32, device.clone());
    let model = Model::new(vb, a, vocab, device)?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: a.lr, weight_decay: 0.01, ..Default::default() })?;
    let mut rng = Rng::new(a.seed);
    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg}")?.progress_chars("=> "));
    bar.set_prefix(name);
    let (mut curve, mut window) = (Vec::new(), Vec::new());
    let start = Instant::now();
    for step in 1..=a.steps {
        let batch = windows(train_ids, a.batch, a.seq, &mut rng);
        let ids = Tensor::from_vec(batch, (a.batch, a.seq), device)?;
        let loss = model.loss(&ids, spec, fused_linear)?;
        opt.backward_step(&loss)?;
        window.push(loss.to_scalar::<f32>()? as f64);
        if step % 25 == 0 || step == a.steps {
            let mean = window.iter().sum::<f64>() / window.len() as f64;
            curve.push((step, mean));
            bar.set_message(format!("loss {mean:.3}"));
            window.clear();
        }
        bar.inc(1);
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();

    // held-out next-token accuracy, on all targets and on keyword targets
    let (mut hit, mut n, mut kw_hit, mut kw_n) = (0usize, 0usize, 0usize, 0usize);
    let per = a.batch;
    for chunk in heldout.chunks(per * a.seq).filter(|c| c.len() == per * a.seq) {
        let ids = Tensor::from_vec(chunk.to_vec(), (per, a.seq), device)?;
        let pred: Vec<u32> = model.forward(&ids)?.argmax(D::Minus1)?.flatten_all()?.to_vec1()?;
        for s in 0..per {
            for t in 0..a.seq - 1 {
                let (p, y) = (pred[s * a.seq + t], chunk[s * a.seq + t + 1]);
                n += 1;
                hit += (p == y) as usize;
                if keywords.contains(&y) {
                    kw_n += 1;
                    kw_hit += (p == y) as usize;
                }
            }
        }
    }
    Ok(RunReport {
        name,
        curve,
        tokens_per_s: (a.steps * a.batch * a.seq) as f64 / secs,
        ms_per_step: secs * 1e3 / a.steps as f64,
        acc_all: hit as f64 / n.max(1) as f64,
        acc_kw: (kw_n > 0).then(|| kw_hit as f64 / kw_n as f64),
        kw_targets: kw_n,
    })
}

fn main() -> Res<()> {
    let a = Args::parse();
    if a.dim % a.heads != 0 {
        // (checked before the tokenizer trains, which takes minutes)
        return Err(format!("--dim {} is not a multiple of --heads {}", a.dim, a.heads).into());
    }
    let corpus = if a.corpus.is_empty() { vec![default_corpus()?] } else { a.corpus.clone() };
    let files = python_files(&corpus, a.max_bytes, a.seed)?;
    // every 10th file is held out
    let (heldout_files, train_files): (Vec<_>, Vec<_>) = files.iter().enumerate().partition(|(i, _)| i % 10 == 9);
    let train_files: Vec<String> = train_files.into_iter().map(|(_, p)| p.to_string_lossy().into_owned()).collect();
    let heldout_files: Vec<PathBuf> = heldout_files.into_iter().map(|(_, p)| p.clone()).collect();

    // a byte-level BPE tokenizer trained on the training files
    let t0 = Instant::now();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(a.vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel>::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::default()))
        .with_post_processor(None)
        .with_decoder(Some(ByteLevel::default()))
        .build()?;
    tokenizer.train_from_files(&mut trainer, train_files.clone())?;
    // The course's tokenizer (trained on data-science code) holds its keywords as single tokens;
    // one trained on a corpus where they are rare would not, so they are added as whole-word
    // tokens (`--learned-keywords-only` keeps only those the BPE learned by itself).
    if !a.learned_keywords_only {
        let added: Vec<AddedToken> =
            a.keywords.iter().map(|k| AddedToken::from(k.clone(), false).single_word(true)).collect();
        tokenizer.add_tokens(added)?;
    }
    let vocab = tokenizer.get_vocab_size(true);
    let eot = tokenizer.token_to_id("<|endoftext|>").unwrap_or(0);
    let encode = |paths: &mut dyn Iterator<Item = PathBuf>| -> Res<Vec<u32>> {
        let mut ids = Vec::new();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            ids.extend(tokenizer.encode(text, false)?.get_ids());
            ids.push(eot);
        }
        Ok(ids)
    };
    let train_ids = encode(&mut train_files.iter().map(PathBuf::from))?;
    let heldout_ids = encode(&mut heldout_files.iter().cloned())?;
    if train_ids.len() <= a.seq || heldout_ids.len() < a.batch * a.seq {
        return Err(format!(
            "the corpus is too small for --seq {} and --batch {}: {} training and {} held-out tokens",
            a.seq,
            a.batch,
            train_ids.len(),
            heldout_ids.len()
        )
        .into());
    }
    let tokenizer_secs = t0.elapsed().as_secs_f64();

    // the course's keywords, bare and space-prefixed (byte-level BPE writes a space as 'Ġ')
    let mut keywords: Vec<(String, u32)> = Vec::new();
    for k in &a.keywords {
        for form in [k.clone(), format!("Ġ{k}")] {
            if let Some(id) = tokenizer.token_to_id(&form) {
                keywords.push((form.replace('Ġ', "␣"), id));
            }
        }
    }
    let kw_ids: Vec<u32> = keywords.iter().map(|(_, id)| *id).collect();
    let count = |ids: &[u32], k: u32| ids.iter().filter(|&&x| x == k).count();

    let device = Device::cuda_if_available(0)?;
    println!(
        "corpus {} ({} files: {} train, {} held out; {} + {} tokens), BPE vocab {vocab} trained in {tokenizer_secs:.1} s",
        corpus.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(" + "),
        files.len(),
        train_files.len(),
        heldout_files.len(),
        train_ids.len(),
        heldout_ids.len()
    );
    println!(
        "keywords as single tokens: {}",
        if keywords.is_empty() {
            "none (the weighted run equals the unweighted one)".to_string()
        } else {
            keywords
                .iter()
                .map(|(s, id)| {
                    format!("{s} (id {id}: {} in train, {} held out)", count(&train_ids, *id), count(&heldout_ids, *id))
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!(
        "model: {} layers, width {}, {} heads{}; batch {}x{}; {} steps; device {:?}; loss through the {}",
        a.layers,
        a.dim,
        a.heads,
        if a.tie_embeddings { ", tied head" } else { "" },
        a.batch,
        a.seq,
        a.steps,
        device,
        match a.loss_path.as_str() {
            "linear" => "fused linear op (no logits)",
            "both" => "logits, then the fused linear op",
            _ => "logits",
        }
    );

    let weighted = LossSpec::builder().keywords(kw_ids.iter().map(|&k| k as i64)).alpha(a.alpha).build()?;
    let plain = LossSpec::builder().alpha(a.alpha).build()?;
    let linear = a.loss_path == "linear";
    let runs = if a.loss_path == "both" {
        [
            train("logits", false, &a, &weighted, &train_ids, &heldout_ids, vocab, &kw_ids, &device)?,
            train("linear", true, &a, &weighted, &train_ids, &heldout_ids, vocab, &kw_ids, &device)?,
        ]
    } else {
        [
            train("weighted", linear, &a, &weighted, &train_ids, &heldout_ids, vocab, &kw_ids, &device)?,
            train("unweighted", linear, &a, &plain, &train_ids, &heldout_ids, vocab, &kw_ids, &device)?,
        ]
    };

    println!();
    let steps: Vec<String> = runs[0].curve.iter().map(|(s, _)| format!("{s:>7}")).collect();
    println!("{:<12}{}", "loss @ step", steps.join(""));
    for r in &runs {
        let vals: Vec<String> = r.curve.iter().map(|(_, l)| format!("{l:>7.3}")).collect();
        println!("{:<12}{}", r.name, vals.join(""));
    }
    println!();
    println!("{:<12}{:>12}{:>10}{:>16}{:>20}", "run", "tokens/s", "ms/step", "acc (all)", "acc (keyword)");
    for r in &runs {
        let kw = r.acc_kw.map_or("n/a".to_string(), |x| format!("{:.3} of {}", x, r.kw_targets));
        println!("{:<12}{:>12.0}{:>10.1}{:>16.3}{:>20}", r.name, r.tokens_per_s, r.ms_per_step, r.acc_all, kw);
    }
    if a.loss_path == "both" {
        let gap = runs[0].curve.iter().zip(&runs[1].curve).map(|((_, x), (_, y))| (x - y).abs()).fold(0f64, f64::max);
        println!("(the weighted loss through the logits and through the fused linear op, same initial weights, seed,");
        println!(" data and steps; largest gap between the two curves: {gap:.2e})");
    } else {
        println!(
            "(weighted: loss weights samples by 1 + keyword count; unweighted: plain mean; same seed, data, steps)"
        );
    }
    Ok(())
}
