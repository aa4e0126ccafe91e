//! [`queue_tiles`] with the host product of `host_product` in place of cuBLAS and host
//! stand-ins for the split's kernels: the statistics step writes a code of (row, block,
//! word), folding only onto the previous block's code of the same rows, and the gradient
//! step must find the last block's (every block folded, in order, before a gradient), the
//! gradient step writes given gradient rows, and the products' results are compared with
//! float64.

use super::super::host_product::*;
use super::*;
use crate::synthetic::Rng;
use std::cell::RefCell;

/// The statistics' stand-in: word `q` of row `row`'s partials of block `k`.
fn code(row: usize, k: usize, q: usize) -> f64 {
    (row * 4096 + k * 8 + q) as f64
}

struct HostTiles<'a> {
    mem: &'a RefCell<Memory>,
    pb: &'a Problem,
    cut: TileCut,
    words: usize,
    /// Buffer indices: z, g16, partials, acc, d hidden.
    z: usize,
    g16: usize,
    partials: usize,
    acc: Option<usize>,
    d_hidden: usize,
    stats_done: Vec<(Range<usize>, Range<usize>)>,
    grads_done: Vec<(Range<usize>, Range<usize>)>,
    narrowed: Vec<usize>,
}

impl HostTiles<'_> {
    fn check_logits(&self, mem: &Memory, rows: &Range<usize>, cols: &Range<usize>, z: u64) {
        assert_eq!(mem.find(z, F32), (self.z, 0), "the logits at the start of z");
        let w = cols.len();
        for (i, r) in rows.clone().enumerate() {
            let got: Vec<f64> = (0..w).map(|j| mem.0[self.z].get(i * w + j)).collect();
            let model: Vec<f64> = cols.clone().map(|c| round(F32, self.pb.logit(r, c).0)).collect();
            let mag: Vec<f64> = cols.clone().map(|c| self.pb.logit(r, c).1).collect();
            assert_rounded(F32, &got, &model, &mag, &format!("logits of row {r}, columns {cols:?}"));
        }
    }
    fn block(&self, cols: &Range<usize>) -> usize {
        assert_eq!(cols.start % self.cut.vb, 0, "a block starting off the cut");
        assert_eq!(cols.len(), self.cut.vb.min(self.pb.shape.vocab() - cols.start), "a block's width");
        cols.start / self.cut.vb
    }
}

impl TileSteps for HostTiles<'_> {
    fn gemm(&mut self, p: Product) -> Result<()> {
        self.mem.borrow_mut().gemm(p);
        Ok(())
    }

    fn stats(&mut self, rows: Range<usize>, cols: Range<usize>, z: u64, out: u64, fold: bool) -> Result<()> {
        let mut mem = self.mem.borrow_mut();
        self.check_logits(&mem, &rows, &cols, z);
        let k = self.block(&cols);
        assert_eq!(fold, k > 0, "folding block {k}");
        let (buf, o) = mem.find(out, F32);
        assert_eq!((buf, o), (self.partials, 0), "block {k}'s partials");
        for (i, r) in rows.clone().enumerate() {
            for q in 0..self.words {
                let at = o + i * self.words + q;
                if fold {
                    assert_eq!(mem.0[buf].get(at), code(r, k - 1, q), "row {r}: block {k} folded onto another");
                }
                mem.0[buf].set(at, code(r, k, q));
            }
        }
        self.stats_done.push((rows, cols));
        Ok(())
    }

    fn grad(&mut self, rows: Range<usize>, cols: Range<usize>, z: u64, g: u64, merged: u64) -> Result<()> {
        let mut mem = self.mem.borrow_mut();
        let v = self.pb.shape.vocab();
        assert_eq!(mem.find(merged, F32), (self.partials, 0), "the merged partials");
        let (last, words) = (self.cut.blocks(v) - 1, self.words);
        for (i, r) in rows.clone().enumerate() {
            for q in 0..words {
                let got = mem.0[self.partials].get(i * words + q);
                assert_eq!(got, code(r, last, q), "row {r}'s statistics (word {q}): not every block's");
            }
        }
        let pb = self.pb;
        if g == 0 {
            let none = pb.dh_ty.is_none() && pb.dw_ty.is_none() && pb.db_ty.is_none();
            assert!(none, "a loss-only step with gradients wanted");
            assert_eq!(cols, 0..v, "a loss-only step over less than the vocabulary");
            self.grads_done.push((rows, cols));
            return Ok(());
        }
        self.check_logits(&mem, &rows, &cols, z);
        let (ty, wide) = (self.pb.ty, self.pb.dtype == DType::F32);
        let gb = if wide { self.z } else { self.g16 };
        assert_eq!(mem.find(g, if wide { F32 } else { ty }), (gb, 0), "the gradient of {rows:?} x {cols:?}");
        let w = cols.len();
        for (i, r) in rows.clone().enumerate() {
            for (j, c) in cols.clone().enumerate() {
                mem.0[gb].set(i * w + j, self.pb.grad[r * v + c] * self.pb.scale);
            }
        }
        self.grads_done.push((rows, cols));
        Ok(())
    }

    fn narrow(&mut self, src: u64, dst: u64, n: usize) -> Result<()> {
        let mut mem = self.mem.borrow_mut();
        let acc = self.acc.expect("narrowing without an accumulator");
        assert_eq!(mem.find(src, F32), (acc, 0), "narrowing from the accumulator");
        let (buf, d0) = mem.find(dst, self.pb.ty);
        assert_eq!(buf, self.d_hidden, "narrowing into d hidden");
        let h = self.pb.shape.hidden();
        assert_eq!(d0 % h, 0, "narrowing into whole rows");
        assert_eq!(d0 / h, self.narrowed.iter().sum::<usize>() / h, "narrowing the next rows");
        for i in 0..n {
            let x = mem.0[acc].get(i);
            mem.0[buf].set(d0 + i, x);
        }
        self.narrowed.push(n);
        Ok(())
    }
}

/// One random tiled call against float64; returns its chunks and blocks.
fn one_call(rng: &mut Rng) -> (usize, usize) {
    let pb = Problem::random(rng);
    let (dtype, shape) = (pb.dtype, pb.shape);
    let (n, h, v) = (shape.rows(), shape.hidden(), shape.vocab());
    let cut = TileCut { r: 1 + rng.below(n as u64) as usize, vb: 1 + rng.below(v as u64) as usize };
    let words = [3, 5][rng.below(2) as usize];
    let blocks = cut.blocks(v);
    let acc_on = pb.dh_ty.is_some_and(|d| d != F32);

    let mut bufs = pb.input_buffers();
    bufs.extend(pb.work_buffers(cut.r * cut.vb, cut.r * cut.vb, cut.r));
    bufs.push(Buf::new("partials", F32, cut.r * words));
    bufs.push(Buf::new("acc", F32, if acc_on { cut.r * h } else { 1 }));
    bufs.extend(pb.grad_buffers());
    let addr: Vec<u64> = bufs.iter().map(Buf::addr).collect();
    let ops = TileOperands { base: pb.operands(&addr, 8), partials: addr[6], acc: acc_on.then_some(addr[7]) };
    let memory = RefCell::new(Memory(bufs));
    let mut steps = HostTiles {
        mem: &memory,
        pb: &pb,
        cut,
        words,
        z: 3,
        g16: 4,
        partials: 6,
        acc: acc_on.then_some(7),
        d_hidden: 8,
        stats_done: Vec::new(),
        grads_done: Vec::new(),
        narrowed: Vec::new(),
    };
    let chunks = queue_tiles(dtype, shape, cut, &ops, &mut steps).unwrap();
    assert_eq!(chunks, n.div_ceil(cut.r));
    // every (chunk, block) once per pass, in order
    let tiles: Vec<(Range<usize>, Range<usize>)> = (0..n)
        .step_by(cut.r)
        .flat_map(|r0| (0..v).step_by(cut.vb).map(move |c0| (r0..n.min(r0 + cut.r), c0..v.min(c0 + cut.vb))))
        .collect();
    let loss_only = pb.dh_ty.is_none() && pb.dw_ty.is_none() && pb.db_ty.is_none();
    let chunk_rows = (0..n).step_by(cut.r).map(|r0| (r0..n.min(r0 + cut.r), 0..v));
    let grads_want: Vec<_> = if loss_only { chunk_rows.collect() } else { tiles.clone() };
    assert_eq!(steps.grads_done, grads_want, "the gradient steps");
    assert_eq!(steps.stats_done, tiles, "the statistics steps");
    let narrowed: usize = steps.narrowed.iter().sum();
    assert_eq!(narrowed, if acc_on { n * h } else { 0 }, "d hidden narrowed once");

    let mem = memory.into_inner();
    let what = format!("{dtype:?} N {n} H {h} V {v} {cut:?} bias {} accumulate {}", pb.with_bias, pb.accumulate);
    // d hidden: block by block into its sum (f32, or the caller's f32), then rounded once
    if let Some(d) = pb.dh_ty {
        let (mut model, mut mag) = (vec![0f64; n * h], vec![0f64; n * h]);
        for i in 0..n * h {
            let (r, q) = (i / h, i % h);
            for c0 in (0..v).step_by(cut.vb) {
                let cols = c0..v.min(c0 + cut.vb);
                let term = |c: usize| pb.grad[r * v + c] * pb.weight[c * h + q];
                model[i] = round(F32, model[i] + cols.clone().map(term).sum::<f64>());
                mag[i] += cols.map(|c| term(c).abs()).sum::<f64>();
            }
            model[i] = round(d, model[i]);
        }
        assert_rounded(d, &mem.0[8].values(), &model, &mag, &format!("d hidden ({what})"));
    }
    pb.check_weight_and_bias(&mem.0[9], &mem.0[10], cut.r, &what);
    (chunks, blocks)
}

#[test]
fn the_tiles_products_and_steps_match_float64_with_a_host_product() {
    let mut rng = Rng::new(0x74696c6573);
    let cases = test_cases(300);
    let (mut multi_chunk, mut multi_block, mut both) = (0, 0, 0);
    for _ in 0..cases {
        let (chunks, blocks) = one_call(&mut rng);
        multi_chunk += (chunks > 1) as usize;
        multi_block += (blocks > 1) as usize;
        both += (chunks > 1 && blocks > 1) as usize;
    }
    // (a handful of calls could all be of one chunk or one block)
    assert!(cases < 20 || (multi_chunk > 0 && multi_block > 0 && both > 0), "calls of several chunks and blocks");
}

#[test]
fn the_schedule_from_its_variable() {
    assert_eq!(LinearSchedule::parse(None).unwrap(), LinearSchedule::Chunks);
    assert_eq!(LinearSchedule::parse(Some(" ")).unwrap(), LinearSchedule::Chunks);
    assert_eq!(LinearSchedule::parse(Some("0")).unwrap(), LinearSchedule::Chunks);
    assert_eq!(LinearSchedule::parse(Some(" 2048")).unwrap(), LinearSchedule::Tiles { cols: 2048 });
    for bad in ["x", "-3", "2k", "1.5"] {
        assert!(LinearSchedule::parse(Some(bad)).is_err(), "{bad}");
    }
}

#[test]
fn the_cut_counts_every_per_row_buffer() {
    let shape = LinearShape::new(8, 1024, 4096, 128_256).unwrap();
    // bf16, a 16-bit d hidden: 2048 x (4 + 2) + 4 x 4096 + 4 x 3 bytes per row
    let cut = TileCut::new(DType::BF16, Chunking::Budget(28_684 * 1000), shape, 2048, true, 3).unwrap();
    assert_eq!(cut, TileCut { r: 960, vb: 2048 });
    let cut = TileCut::new(DType::F32, Chunking::Rows(100), shape, 1 << 20, false, 5).unwrap();
    assert_eq!(cut, TileCut { r: 100, vb: 128_256 });
    assert!(TileCut::new(DType::F32, Chunking::Auto, shape, 0, false, 3).is_err());
    let cut = TileCut::new(DType::F16, Chunking::Auto, shape, 4096, false, 3).unwrap();
    assert_eq!(cut.r % 64, 0);
    assert!(cut.r * (4096 * 6 + 12) <= DEFAULT_BUDGET && (cut.r + 64) * (4096 * 6 + 12) > DEFAULT_BUDGET);
}
