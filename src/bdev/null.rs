//! `null`: completes every valid request at once without touching data.
//! Measures the stack above it.

use std::collections::VecDeque;

use super::{validate, Bdev, Channel, ChannelCtx, IoCompletion, IoRequest};

pub struct NullBdev {
    name: String,
    capacity: u64,
    block_size: u32,
}

impl NullBdev {
    pub fn new(name: &str, capacity: u64, block_size: u32) -> NullBdev {
        NullBdev {
            name: name.into(),
            capacity: capacity / block_size as u64 * block_size as u64,
            block_size,
        }
    }
}

impl Bdev for NullBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn volatile_cache(&self) -> bool {
        false
    }
    fn open_channel(&self, _ctx: &ChannelCtx) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(NullChannel {
            block_size: self.block_size,
            capacity: self.capacity,
            max_io: self.max_io_bytes(),
            ready: VecDeque::new(),
        }))
    }
}

struct NullChannel {
    block_size: u32,
    capacity: u64,
    max_io: u64,
    ready: VecDeque<IoCompletion>,
}

impl Channel for NullChannel {
    fn submit(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        let result = validate(&req, self.block_size, self.capacity, self.max_io);
        self.ready.push_back(IoCompletion {
            tag: req.tag,
            op: req.op,
            result,
            buf: req.buf,
        });
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }
    fn in_flight(&self) -> usize {
        self.ready.len()
    }
}
