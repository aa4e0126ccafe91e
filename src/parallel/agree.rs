//! What the ranks of a group must agree on beyond their shapes, as short digests carried by the
//! first exchanges: the loss options, the call and its chunking, and (in a vocabulary group,
//! whose ranks hold the same samples) the tokens. A rank whose digest differs from rank 0's
//! fails every rank of the group alike ([`Error::GroupCallMismatch`]) before any gradient is
//! written, where it would otherwise hang the group (another number or length of exchanges) or
//! give its ranks different losses without a word.

use crate::dtype::TokenId;
use crate::error::{Error, Result};
use crate::spec::{LossSpec, Tokens};

/// A digest of 32 bits: exact in an `f64` word of an exchange, the same on every machine and
/// build (no hasher of the standard library, whose output may change between releases).
/// Not a defence against anyone: two different calls share a digest with odds of 2^-32.
#[derive(Clone, Copy)]
struct Digest(u64);

impl Digest {
    /// A digest of one kind of thing (`tag` keeps an empty list of one kind apart from another's).
    fn new(tag: u64) -> Self {
        Digest(0x9E37_79B9_7F4A_7C15 ^ tag)
    }

    fn word(mut self, w: u64) -> Self {
        self.0 = (self.0 ^ w).wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(29);
        self
    }

    fn f64(self, x: f64) -> Self {
        // -0 and +0 mean the same option
        self.word(if x == 0.0 { 0 } else { x.to_bits() })
    }

    /// The 32 bits (the mixing's finaliser, then the halves folded).
    fn finish(self) -> u32 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z ^ (z >> 32)) as u32
    }
}

/// The options of `spec` that change the group's result or its exchanges: all but where it runs
/// (`backend`, `cpu_simd`) and `grad_scale` (which scales this rank's own gradient alone),
/// keywords in any order; and the vocabulary `vocab` (the keyword ids' range and smoothing's
/// `1 / V`: a data group's ranks share it too).
pub(crate) fn spec_digest(spec: &LossSpec, vocab: usize) -> u32 {
    // (a weight of -0 is one of +0)
    let mut keys: Vec<(i64, u64)> =
        spec.keywords.iter().map(|k| (k.id, if k.weight == 0.0 { 0 } else { k.weight.to_bits() })).collect();
    keys.sort_unstable();
    let mut d = Digest::new(1).word(keys.len() as u64);
    for (id, w) in keys {
        d = d.word(id as u64).word(w);
    }
    d.f64(spec.alpha)
        .word(spec.ignore_index as u64)
        .word(spec.row_mean as u64)
        .word(spec.reduction as u64)
        .f64(spec.z_loss)
        .f64(spec.label_smoothing)
        .f64(spec.softcap.unwrap_or(0.0))
        .word(spec.softcap.is_some() as u64)
        .word(spec.check_finite as u64)
        .word(vocab as u64)
        .finish()
}

/// [`call_digest`]'s kind of the logits calls (`a`: rows per exchange).
pub(crate) const LOGITS_CALL: u64 = 1;

/// [`call_digest`]'s kind of the fused linear calls (`a`: rows per chunk, resolved from the
/// chunking asked for; `b`: the hidden size).
pub(crate) const LINEAR_CALL: u64 = 2;

/// A call's kind and how it cuts its rows into exchanges: `kind` names the call (the logits, the
/// fused linear path, ...), `a` and `b` its chunking.
pub(crate) fn call_digest(kind: u64, a: u64, b: u64) -> u32 {
    Digest::new(2).word(kind).word(a).word(b).finish()
}

/// The ids, labels and token weights of a call (`seq`: its `T`), as the call reads them: the
/// labels are the ids where none are given and each token's weight is 1 where none are given (a
/// rank that passes them so computes the same as one that leaves them out, and agrees with it),
/// a weight of -0 is one of +0, and a sample's label and weight at position 0 (never a target)
/// are left out.
pub(crate) fn tokens_digest<I: TokenId>(t: &Tokens<'_, I>, seq: usize) -> u32 {
    // positions 1.. of each sample (every position where `seq` is 0: a shape the call refuses)
    let target = |k: usize| seq == 0 || !k.is_multiple_of(seq);
    let mut d = Digest::new(3).word(t.ids.len() as u64).word(seq as u64);
    for &i in t.ids {
        d = d.word(i.to_i64() as u64);
    }
    for (_, &l) in t.labels.unwrap_or(t.ids).iter().enumerate().filter(|&(k, _)| target(k)) {
        d = d.word(l.to_i64() as u64);
    }
    match t.token_weights {
        Some(w) => w.iter().enumerate().filter(|&(k, _)| target(k)).fold(d, |d, (_, &w)| d.f64(w as f64)),
        None => (0..t.ids.len()).filter(|&k| target(k)).fold(d, |d, _| d.f64(1.0)),
    }
    .finish()
}

/// What a rank sends of its call in the first exchanges, beside its shape and slice: words of
/// the vocabulary group's ([`VOCAB_WORDS`]) and of the data group's ([`DATA_WORDS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Agreement {
    /// [`spec_digest`]: every rank of both groups.
    pub spec: u32,
    /// [`call_digest`]: every rank of the vocabulary group.
    pub call: u32,
    /// [`tokens_digest`]: every rank of the vocabulary group.
    pub tokens: u32,
}

/// Words of an [`Agreement`] in the vocabulary group's first exchange.
pub(crate) const VOCAB_WORDS: usize = 3;

/// Words of an [`Agreement`] in the data group's first exchange (the spec's digest).
pub(crate) const DATA_WORDS: usize = 1;

/// What the parts are called in [`Error::GroupCallMismatch`], in the order of the words.
const PARTS: [&str; VOCAB_WORDS] =
    ["loss options or vocabulary size", "call or its chunking (rows per exchange)", "ids, labels or token weights"];

impl Agreement {
    /// `vocab`: the whole vocabulary of the call; `seq`: its `T`.
    pub(crate) fn new<I: TokenId>(
        spec: &LossSpec,
        vocab: usize,
        seq: usize,
        call: u32,
        tokens: &Tokens<'_, I>,
    ) -> Self {
        Agreement { spec: spec_digest(spec, vocab), call, tokens: tokens_digest(tokens, seq) }
    }

    /// The vocabulary group's words ([`VOCAB_WORDS`]).
    pub(crate) fn vocab_words(&self) -> [f64; VOCAB_WORDS] {
        [self.spec as f64, self.call as f64, self.tokens as f64]
    }

    /// The data group's words ([`DATA_WORDS`]).
    pub(crate) fn data_words(&self) -> [f64; DATA_WORDS] {
        [self.spec as f64]
    }
}

/// Checks that every rank's words (`stride` apart, the agreement's `n` words from `at` on, the
/// first `n` of [`PARTS`]) are rank 0's: [`Error::GroupCallMismatch`] for the first rank in rank
/// order whose words differ, naming the first part that does. Every rank sees the same words, so
/// every rank returns the same error.
pub(crate) fn check_agreement(group: &'static str, gathered: &[f64], stride: usize, at: usize, n: usize) -> Result<()> {
    match first_differing(gathered, stride, at, n) {
        Some((rank, part)) => Err(Error::GroupCallMismatch { group, rank, what: PARTS[part] }),
        None => Ok(()),
    }
}

/// The first rank, in rank order, whose words `at..at + n` (of every rank's `stride`) are not
/// rank 0's, and the first of those words that differs.
pub(crate) fn first_differing(gathered: &[f64], stride: usize, at: usize, n: usize) -> Option<(usize, usize)> {
    let mut ranks = gathered.chunks_exact(stride).map(|w| &w[at..at + n]);
    let first = ranks.next()?;
    ranks.enumerate().find_map(|(r, words)| Some((r + 1, words.iter().zip(first).position(|(a, b)| a != b)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_tell_what_differs_and_only_that() {
        let spec = LossSpec::builder().keywords([3, 9]).build().unwrap();
        let same = LossSpec::builder().keywords([9, 3]).backend(crate::Backend::Cpu).build().unwrap();
        assert_eq!(
            spec_digest(&spec, 10),
            spec_digest(&same, 10),
            "keyword order and backend are not the call's meaning"
        );
        let scaled = spec.to_builder().grad_scale(0.5).build().unwrap();
        assert_eq!(spec_digest(&spec, 10), spec_digest(&scaled, 10), "grad_scale scales one rank's gradient alone");
        assert_ne!(spec_digest(&spec, 10), spec_digest(&spec, 11), "the vocabulary");
        for other in [
            spec.to_builder().label_smoothing(0.1).build().unwrap(),
            spec.to_builder().reduction(crate::Reduction::Sum).build().unwrap(),
            spec.to_builder().softcap(30.0).build().unwrap(),
            spec.to_builder().alpha(2.0).build().unwrap(),
            LossSpec::builder().keywords([3]).build().unwrap(),
            LossSpec::builder().weighted_keywords([(3, 1.0), (9, 2.0)]).build().unwrap(),
        ] {
            assert_ne!(spec_digest(&spec, 10), spec_digest(&other, 10), "{other:?}");
        }
        let ids = [1i64, 2, 3, 4];
        let base = tokens_digest(&Tokens::new(&ids), 4);
        assert_eq!(base, tokens_digest(&Tokens::new(&[1i32, 2, 3, 4]), 4), "the id type is not the call's meaning");
        assert_ne!(base, tokens_digest(&Tokens::new(&[1i64, 2, 3, 5]), 4));
        assert_ne!(base, tokens_digest(&Tokens::new(&ids), 2), "[1, 4] is not [2, 2]");
        // what the call computes, not which inputs were given: labels equal to the ids, and
        // weights of 1 (or -0 for 0), are the same call
        assert_eq!(base, tokens_digest(&Tokens::new(&ids).with_labels(&ids), 4), "labels that are the ids");
        assert_ne!(base, tokens_digest(&Tokens::new(&ids).with_labels(&[1i64, 2, 3, -100]), 4), "other labels");
        assert_eq!(base, tokens_digest(&Tokens::new(&ids).with_token_weights(&[1.0f32; 4]), 4), "weights of 1");
        assert_ne!(base, tokens_digest(&Tokens::new(&ids).with_token_weights(&[1.0f32, 1.0, 1.0, 2.0]), 4));
        let zero = tokens_digest(&Tokens::new(&ids).with_token_weights(&[1.0f32, 0.0, 1.0, 1.0]), 4);
        let minus = tokens_digest(&Tokens::new(&ids).with_token_weights(&[1.0f32, -0.0, 1.0, 1.0]), 4);
        assert_eq!(zero, minus, "-0 is 0");
        assert_ne!(zero, base);
        // a sample's position 0 is never a target: its label and weight are not the call's meaning
        // (its id is: keywords are counted on every id)
        let (other_first, weights) = ([1i64, 2, 7, 4], [9.0f32, 1.0, 5.0, 1.0]);
        let two = tokens_digest(&Tokens::new(&ids), 2);
        assert_eq!(two, tokens_digest(&Tokens::new(&ids).with_labels(&[8i64, 2, -100, 4]), 2));
        assert_eq!(
            two,
            tokens_digest(&Tokens::new(&ids).with_labels(&[1i64, 2, 3, 4]).with_token_weights(&weights), 2)
        );
        assert_ne!(two, tokens_digest(&Tokens::new(&other_first).with_labels(&ids), 2), "an id at position 0");
        assert_ne!(two, tokens_digest(&Tokens::new(&ids).with_labels(&[1i64, 2, 3, 5]), 2));
        let signed = LossSpec::builder().weighted_keywords([(3, 0.0), (9, 1.0)]).build().unwrap();
        let minus = LossSpec::builder().weighted_keywords([(3, -0.0), (9, 1.0)]).build().unwrap();
        assert_eq!(spec_digest(&signed, 10), spec_digest(&minus, 10), "a keyword weight of -0 is 0");
        assert_ne!(call_digest(0, 4, 0), call_digest(0, 5, 0));
        assert_ne!(call_digest(0, 4, 0), call_digest(1, 4, 0));
    }

    #[test]
    fn the_first_rank_and_part_that_differ_are_named() {
        // three ranks of [B, T, spec, call, tokens] words
        let g = [2.0, 6.0, 1.0, 2.0, 3.0, 2.0, 6.0, 1.0, 2.0, 3.0, 2.0, 6.0, 1.0, 7.0, 4.0];
        assert_eq!(
            check_agreement("vocabulary", &g, 5, 2, 3),
            Err(Error::GroupCallMismatch { group: "vocabulary", rank: 2, what: PARTS[1] })
        );
        assert_eq!(check_agreement("vocabulary", &g[..10], 5, 2, 3), Ok(()));
        assert_eq!(check_agreement("data", &g, 5, 2, 1), Ok(()));
    }
}
