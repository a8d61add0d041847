//! Helpers shared by the data-path tests: run requests on a reactor and wait.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sealdisk::bdev::{BdevRef, IoCompletion, IoError, IoOp, IoRequest};
use sealdisk::reactor::{ReactorConfig, Reactors};

/// One request for [`run_ios`].
#[derive(Clone, Debug)]
pub enum Op {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    Flush,
    Unmap { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
}

/// What came back: the read data (or the write's buffer after completion).
#[derive(Debug)]
pub struct Done {
    pub result: Result<(), IoError>,
    pub data: Vec<u8>,
}

pub fn reactors(cores: &[usize]) -> Reactors {
    let cfg = ReactorConfig {
        cores: cores.to_vec(),
        pool_bytes: 16 << 20,
        ..ReactorConfig::default()
    };
    Reactors::start(&cfg).expect("reactors start")
}

/// Open a channel on reactor `r`, run `ops` one after another, return their
/// results.
pub fn run_ios(reactors: &Reactors, r: usize, bdev: &BdevRef, ops: Vec<Op>) -> Vec<Done> {
    let bdev = bdev.clone();
    reactors
        .call(r, Duration::from_secs(30), move |ctx| {
            let mut ch = bdev.open_channel(&ctx.chan).expect("open channel");
            let mut out = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                let tag = i as u64;
                let req = match op {
                    Op::Read { offset, len } => {
                        let mut b = ctx.chan.pool.alloc(len.max(1)).expect("buffer");
                        b.set_len(len);
                        b.fill(0xEE);
                        IoRequest::read(offset, b, tag)
                    }
                    Op::Write { offset, data } => {
                        let mut b = ctx.chan.pool.alloc(data.len().max(1)).expect("buffer");
                        b.set_len(data.len());
                        b.copy_from_slice(&data);
                        IoRequest::write(offset, b, tag)
                    }
                    Op::Flush => IoRequest::flush(tag),
                    Op::Unmap { offset, len } => IoRequest::unmap(offset, len, tag),
                    Op::WriteZeroes { offset, len } => IoRequest::write_zeroes(offset, len, tag),
                };
                ch.submit(req).expect("no back-pressure in a single-request test");
                let c = wait_one(&mut *ch);
                assert_eq!(c.tag, tag);
                out.push(Done {
                    result: c.result,
                    data: c.buf.map(|b| b.to_vec()).unwrap_or_default(),
                });
            }
            out
        })
        .expect("reactor answers")
}

pub fn wait_one(ch: &mut dyn sealdisk::bdev::Channel) -> IoCompletion {
    let t = Instant::now();
    let mut v = Vec::new();
    loop {
        ch.poll(&mut v);
        if let Some(c) = v.pop() {
            return c;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "request did not complete");
        std::thread::yield_now();
    }
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn test_key(seed: u8) -> [u8; 64] {
    core::array::from_fn(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
}

pub fn xts(seed: u8) -> Arc<sealdisk::crypto::Xts> {
    Arc::new(sealdisk::crypto::Xts::new(&test_key(seed)).unwrap())
}

pub fn is_ok(d: &Done) -> bool {
    d.result.is_ok()
}

pub fn op_name(op: &Op) -> IoOp {
    match op {
        Op::Read { .. } => IoOp::Read,
        Op::Write { .. } => IoOp::Write,
        Op::Flush => IoOp::Flush,
        Op::Unmap { .. } => IoOp::Unmap,
        Op::WriteZeroes { .. } => IoOp::WriteZeroes,
    }
}

/// If `reply` names a background task (`TaskId`), waits for it through `describe`
/// (a DescribeTasks call for the task's account) and returns its result, or its error
/// as (code, message). Other replies come back as they are.
pub fn wait_task(
    reply: serde_json::Value,
    mut describe: impl FnMut(serde_json::Value) -> serde_json::Value,
) -> Result<serde_json::Value, (String, String)> {
    let Some(id) = reply.get("TaskId").and_then(|v| v.as_str()).map(str::to_owned) else {
        return Ok(reply);
    };
    let t = Instant::now();
    loop {
        let v = describe(serde_json::json!({ "TaskIds": [id] }));
        let task = &v["TaskSet"]["Task"][0];
        match task["TaskStatus"].as_str() {
            Some("Finished") => return Ok(task["Result"].clone()),
            Some("Failed") => {
                return Err((
                    task["Error"]["Code"].as_str().unwrap_or("").to_owned(),
                    task["Error"]["Message"].as_str().unwrap_or("").to_owned(),
                ))
            }
            Some("Cancelled") => return Err(("OperationCancelled".into(), "cancelled".into())),
            Some("Processing") => {}
            _ => panic!("task {id}: {v}"),
        }
        assert!(t.elapsed() < Duration::from_secs(120), "task {id} did not finish: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
