//! What the ranks send each other: the words of the exchanges (a rank's row statistics sealed
//! with its vocabulary slice; the vocabulary group's first exchange) and the checks every rank
//! runs on what it gathered, so that all of them reach the same verdict.

use super::agree::{first_differing, Agreement, VOCAB_WORDS};
use super::VocabSlice;
use crate::cpu::split::encode;
use crate::cpu::RowStats;
use crate::error::{Error, Result};

/// Words after a rank's row statistics in an exchange: its slice `(start, len, vocab)`.
pub(crate) const SLICE_WORDS: usize = 3;

/// Words that begin each rank's words in the vocabulary group's first exchange
/// ([`encode_first`]): the rank's `[B, T]`.
pub(crate) const TOKEN_WORDS: usize = 2;

/// Words of every rank in the vocabulary group's first exchange: its `[B, T]`, its agreement
/// (the digests of its spec, call and tokens), then its slice.
pub(crate) const FIRST_WORDS: usize = TOKEN_WORDS + VOCAB_WORDS + SLICE_WORDS;

/// Every word a rank that failed before (or, on a grid, in) the call's first exchanges sends in
/// them: its `[B, T]` and slice words (and, in the data group, its `[B, Σ w_b]`), in place of
/// numbers that are never negative. The same lengths as a healthy rank's words, no more bytes.
pub(crate) const FAILED: f64 = -1.0;

/// Writes the statistics of `st` (`words` per row), then `slice`'s words, into `out`
/// (`st.len() * words + SLICE_WORDS` long).
pub(crate) fn encode_sealed(st: &[RowStats], words: usize, slice: VocabSlice, out: &mut [f64]) {
    let (rows, tail) = out.split_at_mut(st.len() * words);
    for (s, o) in st.iter().zip(rows.chunks_exact_mut(words)) {
        encode(s, o);
    }
    tail.copy_from_slice(&[slice.start() as f64, slice.len() as f64, slice.vocab() as f64]);
}

/// This rank's words of the vocabulary group's first exchange into `out` ([`FIRST_WORDS`]
/// long): `tokens` (`[B, T]`), `agree`'s words, then `slice`'s words.
pub(crate) fn encode_first(tokens: [usize; 2], agree: Agreement, slice: VocabSlice, out: &mut [f64]) {
    let (head, tail) = out.split_at_mut(TOKEN_WORDS);
    head.copy_from_slice(&tokens.map(|x| x as f64));
    let (mid, tail) = tail.split_at_mut(VOCAB_WORDS);
    mid.copy_from_slice(&agree.vocab_words());
    encode_sealed(&[], 1, slice, tail);
}

/// Checks the `[B, T]` words that begin each rank's words of the vocabulary group's first
/// exchange (`gathered`: every rank's [`FIRST_WORDS`], whose slice words [`check_sealed`]
/// passed): every rank's the same. Every rank sees the same words and so returns the same
/// error ([`Error::GroupShapeMismatch`], the first rank whose shape is not rank 0's).
pub(crate) fn check_same_tokens(gathered: &[f64]) -> Result<()> {
    let tokens = |r: usize| [gathered[r * FIRST_WORDS] as usize, gathered[r * FIRST_WORDS + 1] as usize];
    match first_differing(gathered, FIRST_WORDS, 0, TOKEN_WORDS) {
        Some((rank, _)) => Err(Error::GroupShapeMismatch { rank, expected: tokens(0), got: tokens(rank) }),
        None => Ok(()),
    }
}

/// Checks the slice words that end each rank's `stride` words of an all-gather: whole
/// numbers, every rank naming `vocab`, the slices tiling `[0, vocab)`. A rank's words that are
/// not a slice say that the gather was not of whole
/// [`ShardedLoss::partials`](super::ShardedLoss::partials) outputs (its length per rank
/// differs, or only this rank's own were passed); words all [`FAILED`], that the rank failed
/// before the exchange ([`Error::PeerFailed`]).
pub(crate) fn check_sealed(gathered: &[f64], stride: usize, vocab: usize) -> Result<()> {
    if let Some(rank) =
        gathered.chunks_exact(stride).position(|w| w[stride - SLICE_WORDS..].iter().all(|&x| x == FAILED))
    {
        return Err(Error::PeerFailed { group: "vocabulary", rank });
    }
    let mut slices = Vec::new();
    let mut vocabs = Vec::new();
    for (r, words) in gathered.chunks_exact(stride).enumerate() {
        let tail = &words[stride - SLICE_WORDS..];
        let whole = |x: f64| x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53);
        if !tail.iter().all(|&x| whole(x)) {
            return Err(Error::Collective(format!(
                "rank {r}'s exchange words end in {tail:?}, not a vocabulary slice: the gathered partials are \
                 not every rank's whole partials output, in rank order"
            )));
        }
        slices.push((tail[0] as usize, tail[1] as usize));
        vocabs.push(tail[2] as usize);
    }
    if vocabs.iter().any(|&v| v != vocab) {
        return Err(Error::VocabMismatch { vocabs });
    }
    super::check_tiling(&slices, vocab)
}

/// Checks an all-gather of two numbers per rank: a whole number of pairs, at least one.
pub(crate) fn check_pairs(what: &'static str, gathered: &[f64]) -> Result<()> {
    if gathered.is_empty() || !gathered.len().is_multiple_of(2) {
        return Err(Error::ExchangeLength { what, expected: 2 * (gathered.len() / 2).max(1), got: gathered.len() });
    }
    Ok(())
}
