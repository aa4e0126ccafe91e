//! The vocabulary group's exchange: one buffer of words per rank gathered in rank order through
//! the caller's [`Collective`], every rank's slice checked on every exchange (the one calls on
//! host buffers, their pipeline and the fused-linear split share it).

use super::agree::{check_agreement, Agreement, VOCAB_WORDS};
use super::wire::{check_same_tokens, check_sealed, encode_first, FAILED, FIRST_WORDS, TOKEN_WORDS};
use super::{Collective, VocabSlice};
use crate::error::Result;

/// The vocabulary group's exchange of one chunk: this rank's words (its rows' statistics, then
/// its slice: [`ShardedLoss::partials_len`]) gathered in rank order, every rank's slice checked
/// to name the same vocabulary and to tile it, on every exchange.
pub(super) struct Exchange<'a> {
    group: &'a dyn Collective,
    vocab: usize,
    send: Vec<f64>,
    recv: Vec<f64>,
}

impl<'a> Exchange<'a> {
    pub(super) fn new(group: &'a dyn Collective, slice: VocabSlice) -> Self {
        Exchange { group, vocab: slice.vocab(), send: Vec::new(), recv: Vec::new() }
    }

    /// The send buffer for `n` words (the slice's words last).
    pub(super) fn buffer(&mut self, n: usize) -> &mut [f64] {
        self.send.resize(n, 0.0);
        &mut self.send[..]
    }

    /// The group's first exchange: every rank's `[B, T]`, agreement and slice alone
    /// ([`FIRST_WORDS`] words, the same length on every rank whatever its shape), checked before
    /// the chunks, whose number and lengths follow from `B · T`, `V`, the options and the
    /// chunking, and before any write: the slices tile one vocabulary, every rank holds tokens of
    /// the same shape ([`Error::GroupShapeMismatch`] otherwise) and made the same call with the
    /// same tokens ([`Error::GroupCallMismatch`] otherwise), on every rank alike. `None`: this
    /// rank failed, and its words say so ([`FAILED`]); the others' check fails with
    /// [`Error::PeerFailed`]. The outer error: the exchange itself failed; the inner one: the
    /// check's.
    pub(super) fn check_slices(&mut self, mine: Option<([usize; 2], Agreement, VocabSlice)>) -> Result<Result<()>> {
        match mine {
            Some((tokens, agree, slice)) => encode_first(tokens, agree, slice, self.buffer(FIRST_WORDS)),
            None => self.buffer(FIRST_WORDS).fill(FAILED),
        }
        let vocab = self.vocab;
        let gathered = self.all_gather(FIRST_WORDS)?;
        Ok(check_sealed(gathered, FIRST_WORDS, vocab)
            .and_then(|()| check_same_tokens(gathered))
            .and_then(|()| check_agreement("vocabulary", gathered, FIRST_WORDS, TOKEN_WORDS, VOCAB_WORDS)))
    }

    /// Every rank's `n` words (the send buffer itself in a group of one), and the stride
    /// between ranks, their slice words checked.
    pub(super) fn gather(&mut self, n: usize) -> Result<(&[f64], usize)> {
        let vocab = self.vocab;
        let gathered = self.all_gather(n)?;
        check_sealed(gathered, n, vocab)?;
        Ok((gathered, n))
    }

    /// Every rank's `n` words, unchecked (the send buffer itself in a group of one).
    fn all_gather(&mut self, n: usize) -> Result<&[f64]> {
        let size = self.group.size();
        if size == 1 {
            return Ok(&self.send[..n]);
        }
        self.recv.resize(n * size, 0.0);
        self.group.all_gather_f64(&self.send[..n], &mut self.recv)?;
        Ok(&self.recv)
    }
}
