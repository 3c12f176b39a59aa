//! The input of one model step: a varlen batch of sequences at different positions.

pub use ragnode_kernels::attention::SeqSpan;

/// One forward step over many sequences. Row `i` of the batch is token `tokens[i]` at
/// position `positions[i]` of its sequence; its key/value go to cache slot `slots[i]`.
/// `seqs` groups consecutive rows by sequence (decode: one row; prefill chunk: many).
#[derive(Clone, Debug, Default)]
pub struct BatchInput {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSpan>,
    /// Rows whose next-token logits are wanted, in output order (usually the last row
    /// of each sequence that finishes its prompt or decodes this step).
    pub logits_rows: Vec<u32>,
}

impl BatchInput {
    /// Checks a step against the model: the cache has the model's layout and every token is
    /// in its vocabulary.
    pub fn check(
        &self,
        cache: crate::KvCacheLayout,
        model: crate::KvCacheLayout,
        vocab_size: usize,
    ) -> crate::Result<()> {
        let err = |m: String| crate::ModelError::Candle(candle_core::Error::Msg(m));
        if cache != model {
            return Err(err(format!("kv cache layout {cache:?} does not fit the model {model:?}")));
        }
        match self.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            Some(&bad) => Err(err(format!("token id {bad} is outside the vocabulary ({vocab_size})"))),
            None => Ok(()),
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Appends `tokens` of one sequence whose context already holds `ctx_before` tokens,
    /// placed by `block_table` (blocks of `block_size`). Asks for logits of its last row
    /// when `want_logits`.
    pub fn push_sequence(
        &mut self,
        tokens: &[u32],
        ctx_before: usize,
        block_table: &[u32],
        block_size: usize,
        want_logits: bool,
    ) {
        let q_start = self.tokens.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = ctx_before + i;
            self.tokens.push(t);
            self.positions.push(pos as u32);
            self.slots.push(block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
        }
        self.seqs.push(SeqSpan {
            q_start,
            q_len: tokens.len(),
            ctx_len: ctx_before + tokens.len(),
            block_table: block_table.to_vec(),
        });
        if want_logits && !tokens.is_empty() {
            self.logits_rows.push((q_start + tokens.len() - 1) as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_block_table() {
        let mut b = BatchInput::default();
        b.push_sequence(&[1, 2, 3], 3, &[7, 2], 4, true);
        b.push_sequence(&[9], 0, &[5], 4, false);
        assert_eq!(b.positions, vec![3, 4, 5, 0]);
        assert_eq!(b.slots, vec![7 * 4 + 3, 2 * 4, 2 * 4 + 1, 5 * 4]);
        assert_eq!(b.logits_rows, vec![2]);
        assert_eq!(b.seqs[1].q_start, 3);
        assert_eq!(b.seqs[0].ctx_len, 6);
    }
}
