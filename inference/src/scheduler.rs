//! `BatchScheduler`: decides, step by step, which tokens of which sequences the model
//! computes, under a token budget and the KV block pool.
//!
//! Each step:
//! 1. every running sequence that is decoding gets its one token (they come first, so a
//!    long prompt never stalls the streams already flowing);
//! 2. sequences part-way through their prompt get a chunk of it (chunked prefill);
//! 3. waiting sequences are admitted in arrival order while budget, sequence slots and
//!    free blocks last (a full pool makes them wait; it never over-commits).
//!
//! When a running sequence needs a block and none is free, the most recently admitted
//! sequence is preempted: its blocks are freed and it goes back to the head of the queue,
//! to be recomputed from its tokens (prompt + generated so far) when blocks free up.
//!
//! The scheduler is model-free; the engine attaches its per-request state as `P`.

use std::collections::VecDeque;

use crate::block_pool::KvBlockPool;
use crate::request::RequestId;

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (decode tokens + prefill chunks).
    pub max_batch_tokens: usize,
}

/// A sequence known to the scheduler.
#[derive(Debug)]
pub struct Sequence<P> {
    pub id: RequestId,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys/values are in the cache.
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    pub payload: P,
}

impl<P> Sequence<P> {
    pub fn new(id: RequestId, prompt: Vec<u32>, payload: P) -> Self {
        let prompt_len = prompt.len();
        Self { id, tokens: prompt, prompt_len, num_computed: 0, block_table: Vec::new(), payload }
    }

    fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}

/// One sequence's share of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepItem {
    pub id: RequestId,
    /// Tokens `start..start + len` are computed this step.
    pub start: usize,
    pub len: usize,
    /// True when this step computes the sequence's last pending token, so its logits
    /// give the next token.
    pub samples: bool,
}

pub struct BatchScheduler<P> {
    cfg: SchedulerConfig,
    pool: KvBlockPool,
    waiting: VecDeque<Sequence<P>>,
    /// In admission order (oldest first).
    running: Vec<Sequence<P>>,
    preemptions: u64,
}

impl<P> BatchScheduler<P> {
    pub fn new(cfg: SchedulerConfig, pool: KvBlockPool) -> Self {
        Self { cfg, pool, waiting: VecDeque::new(), running: Vec::new(), preemptions: 0 }
    }

    pub fn pool(&self) -> &KvBlockPool {
        &self.pool
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a new sequence behind those already waiting.
    pub fn enqueue(&mut self, seq: Sequence<P>) {
        self.waiting.push_back(seq);
    }

    pub fn get_mut(&mut self, id: RequestId) -> Option<&mut Sequence<P>> {
        self.running.iter_mut().chain(self.waiting.iter_mut()).find(|s| s.id == id)
    }

    pub fn get(&self, id: RequestId) -> Option<&Sequence<P>> {
        self.running.iter().chain(self.waiting.iter()).find(|s| s.id == id)
    }

    /// Removes a sequence (finished or cancelled) and frees its blocks.
    pub fn remove(&mut self, id: RequestId) -> Option<Sequence<P>> {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.pool.release(&mut seq.block_table);
        Some(seq)
    }

    /// Removes every sequence for which `f` is true.
    pub fn remove_where(&mut self, mut f: impl FnMut(&Sequence<P>) -> bool) -> Vec<Sequence<P>> {
        let ids: Vec<RequestId> =
            self.running.iter().chain(self.waiting.iter()).filter(|s| f(s)).map(|s| s.id).collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Ids of the waiting sequences, in queue order.
    pub fn waiting_ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.waiting.iter().map(|s| s.id)
    }

    /// Plans the next step and reserves its blocks.
    pub fn schedule(&mut self) -> Vec<StepItem> {
        let mut budget = self.cfg.max_batch_tokens;
        let mut items: Vec<StepItem> = Vec::new();

        // Decodes first, then prefill chunks of admitted sequences, oldest first.
        for decode_pass in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let pending = self.running[i].pending();
                let is_decode = pending == 1 && self.running[i].num_computed > 0;
                if pending == 0 || is_decode != decode_pass || items.iter().any(|it| it.id == self.running[i].id) {
                    i += 1;
                    continue;
                }
                let len = pending.min(budget);
                match self.reserve(i, len, &items) {
                    Reserve::Ok => {
                        let s = &self.running[i];
                        items.push(StepItem { id: s.id, start: s.num_computed, len, samples: len == pending });
                        budget -= len;
                        i += 1;
                    }
                    // Sequence `i` itself went back to the queue; the next one slid into `i`.
                    Reserve::SelfPreempted => {}
                }
            }
        }

        // Admissions, in arrival order; head-of-line blocking keeps the queue fair.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(front) = self.waiting.front() else { break };
            let len = front.pending().min(budget);
            let need = self.pool.shortfall(&front.block_table, front.num_computed + len);
            // Keep a little headroom while others run, so an admission does not force an
            // immediate preemption.
            let watermark = if self.running.is_empty() { 0 } else { (self.pool.total_blocks() / 100).max(1) };
            if need + watermark > self.pool.free_blocks() {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            let grown = self.pool.grow(&mut seq.block_table, seq.num_computed + len);
            debug_assert!(grown);
            let pending = seq.pending();
            items.push(StepItem { id: seq.id, start: seq.num_computed, len, samples: len == pending });
            budget -= len;
            self.running.push(seq);
        }
        items
    }

    /// Makes room for `len` more tokens of running sequence `i`, preempting the newest
    /// sequences not yet planned this step if the pool is short.
    fn reserve(&mut self, i: usize, len: usize, planned: &[StepItem]) -> Reserve {
        loop {
            let s = &mut self.running[i];
            if self.pool.grow(&mut s.block_table, s.num_computed + len) {
                return Reserve::Ok;
            }
            let victim = (0..self.running.len())
                .rev()
                .find(|&j| j != i && !planned.iter().any(|it| it.id == self.running[j].id));
            match victim {
                Some(j) => self.preempt(j),
                None => {
                    self.preempt(i);
                    return Reserve::SelfPreempted;
                }
            }
        }
    }

    fn preempt(&mut self, j: usize) {
        let mut seq = self.running.remove(j);
        tracing::debug!(id = seq.id, tokens = seq.tokens.len(), "preempting: KV cache full");
        self.pool.release(&mut seq.block_table);
        seq.num_computed = 0;
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Records that the planned tokens were computed.
    pub fn complete(&mut self, items: &[StepItem]) {
        for it in items {
            if let Some(s) = self.running.iter_mut().find(|s| s.id == it.id) {
                s.num_computed = it.start + it.len;
            }
        }
    }
}

enum Reserve {
    Ok,
    SelfPreempted,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, budget: usize, max_seqs: usize) -> BatchScheduler<()> {
        BatchScheduler::new(
            SchedulerConfig { max_num_seqs: max_seqs, max_batch_tokens: budget },
            KvBlockPool::new(blocks, 4),
        )
    }

    /// Runs a step: marks items computed and appends a token to sampling sequences.
    fn step(s: &mut BatchScheduler<()>) -> Vec<StepItem> {
        let items = s.schedule();
        s.complete(&items);
        for it in &items {
            if it.samples {
                s.get_mut(it.id).unwrap().tokens.push(0);
            }
        }
        items
    }

    #[test]
    fn long_prompts_are_chunked_and_decodes_go_first() {
        let mut s = sched(100, 8, 8);
        s.enqueue(Sequence::new(1, vec![1; 3], ()));
        let items = step(&mut s);
        assert_eq!(items, vec![StepItem { id: 1, start: 0, len: 3, samples: true }]);
        s.enqueue(Sequence::new(2, vec![1; 20], ()));
        // Seq 1 decodes (1 token) and seq 2 gets the remaining 7 of the budget.
        let items = step(&mut s);
        assert_eq!(items[0], StepItem { id: 1, start: 3, len: 1, samples: true });
        assert_eq!(items[1], StepItem { id: 2, start: 0, len: 7, samples: false });
        let items = step(&mut s);
        assert_eq!(items[0].id, 1);
        assert_eq!(items[1], StepItem { id: 2, start: 7, len: 7, samples: false });
        let items = step(&mut s);
        assert_eq!(items[1], StepItem { id: 2, start: 14, len: 6, samples: true });
        let items = step(&mut s);
        assert_eq!(items.iter().map(|i| i.len).collect::<Vec<_>>(), vec![1, 1]);
    }

    #[test]
    fn full_pool_makes_new_sequences_wait_then_admits_them() {
        let mut s = sched(4, 64, 8); // 4 blocks of 4 tokens
        s.enqueue(Sequence::new(1, vec![1; 12], ())); // 3 blocks
        s.enqueue(Sequence::new(2, vec![1; 8], ())); // 2 blocks: must wait
        let items = step(&mut s);
        assert_eq!(items.len(), 1);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.pool().free_blocks(), 1);
        s.remove(1);
        assert_eq!(s.pool().free_blocks(), 4);
        let items = step(&mut s);
        assert_eq!(items[0].id, 2);
        assert_eq!(s.num_waiting(), 0);
    }

    #[test]
    fn growth_preempts_the_newest_and_it_resumes_later() {
        let mut s = sched(5, 64, 8); // 5 blocks of 4 slots
        s.enqueue(Sequence::new(1, vec![1; 8], ())); // 2 blocks
        s.enqueue(Sequence::new(2, vec![1; 7], ())); // 2 blocks (+1 watermark)
        step(&mut s);
        assert_eq!(s.num_running(), 2);
        step(&mut s); // seq 1 grows to its third block; seq 2 still fits in two
        assert_eq!(s.pool().free_blocks(), 0);
        assert_eq!(s.preemptions(), 0);
        // Seq 2 (9 tokens) needs a third block: the pool is empty, seq 1 is already
        // planned, so seq 2 — the newest — goes back to the queue.
        let items = step(&mut s);
        assert_eq!(s.preemptions(), 1);
        assert_eq!(items, vec![StepItem { id: 1, start: 9, len: 1, samples: true }]);
        assert_eq!(s.waiting_ids().collect::<Vec<_>>(), vec![2]);
        // It keeps its generated tokens and is recomputed from scratch once room frees.
        assert_eq!(s.get(2).unwrap().tokens.len(), 9);
        assert_eq!(s.get(2).unwrap().num_computed, 0);
        s.remove(1);
        let items = step(&mut s);
        assert_eq!(items, vec![StepItem { id: 2, start: 0, len: 9, samples: true }]);
    }

    #[test]
    fn max_num_seqs_bounds_the_batch() {
        let mut s = sched(100, 64, 2);
        for id in 0..3 {
            s.enqueue(Sequence::new(id, vec![1; 2], ()));
        }
        step(&mut s);
        assert_eq!(s.num_running(), 2);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn removal_frees_blocks_of_waiting_and_running() {
        let mut s = sched(10, 64, 8);
        s.enqueue(Sequence::new(1, vec![1; 5], ()));
        step(&mut s);
        s.enqueue(Sequence::new(2, vec![1; 5], ()));
        let removed = s.remove_where(|_| true);
        assert_eq!(removed.len(), 2);
        assert_eq!(s.pool().free_blocks(), 10);
        assert!(s.is_idle());
    }
}
