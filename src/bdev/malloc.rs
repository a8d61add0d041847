//! `malloc`: a RAM disk. Requests complete on the next poll.
//!
//! The memory is shared by every reactor's channel, so it is stored as
//! `AtomicU64` words copied with relaxed loads and stores: concurrent writes
//! to one block from two reactors give some mix of the two (as on a real
//! disk), never undefined behaviour, and no lock is taken.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{validate, Bdev, Channel, ChannelCtx, IoCompletion, IoError, IoOp, IoRequest};

pub struct MallocBdev {
    name: String,
    words: Arc<[AtomicU64]>,
    block_size: u32,
}

impl MallocBdev {
    /// A zero-filled RAM disk of `capacity` bytes (rounded down to blocks).
    pub fn new(name: &str, capacity: u64, block_size: u32) -> MallocBdev {
        let capacity = capacity / block_size as u64 * block_size as u64;
        let words: Arc<[AtomicU64]> = (0..capacity / 8).map(|_| AtomicU64::new(0)).collect();
        MallocBdev {
            name: name.into(),
            words,
            block_size,
        }
    }
}

impl Bdev for MallocBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn capacity(&self) -> u64 {
        self.words.len() as u64 * 8
    }
    fn volatile_cache(&self) -> bool {
        false
    }
    fn open_channel(&self, _ctx: &ChannelCtx) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(MallocChannel {
            words: self.words.clone(),
            block_size: self.block_size,
            max_io: self.max_io_bytes(),
            ready: Vec::new(),
        }))
    }
}

struct MallocChannel {
    words: Arc<[AtomicU64]>,
    block_size: u32,
    max_io: u64,
    /// Finished in submit order; handed over whole on the next poll.
    ready: Vec<IoCompletion>,
}

impl MallocChannel {
    fn run(&self, req: &mut IoRequest) -> Result<(), IoError> {
        validate(req, self.block_size, self.words.len() as u64 * 8, self.max_io)?;
        let first = (req.offset / 8) as usize;
        match req.op {
            IoOp::Read => {
                let buf = req.buf.as_mut().expect("validated");
                for (chunk, w) in buf.chunks_exact_mut(8).zip(&self.words[first..]) {
                    chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
                }
            }
            IoOp::Write => {
                let buf = req.buf.as_ref().expect("validated");
                for (chunk, w) in buf.chunks_exact(8).zip(&self.words[first..]) {
                    w.store(u64::from_ne_bytes(chunk.try_into().unwrap()), Ordering::Relaxed);
                }
            }
            IoOp::Unmap | IoOp::WriteZeroes => {
                for w in &self.words[first..first + (req.len / 8) as usize] {
                    w.store(0, Ordering::Relaxed);
                }
            }
            IoOp::Flush => {}
        }
        Ok(())
    }
}

impl Channel for MallocChannel {
    fn submit(&mut self, mut req: IoRequest) -> Result<(), IoRequest> {
        let result = self.run(&mut req);
        self.ready.push(IoCompletion {
            tag: req.tag,
            op: req.op,
            result,
            buf: req.buf,
        });
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let n = self.ready.len();
        out.append(&mut self.ready);
        n
    }
    fn in_flight(&self) -> usize {
        self.ready.len()
    }
}
