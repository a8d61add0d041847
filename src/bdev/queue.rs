//! [`IoQueue`]: the one way to drive a [`Channel`] from outside the bdev stack.
//!
//! Whoever keeps requests in flight on a channel (the benchmark job, the control
//! plane's copy job, the fio engine, the tests) needs the same four things: count
//! what is in flight, keep the request a channel handed back under back-pressure
//! and send it again before anything new, collect completions into storage that is
//! reused from poll to poll, and, where the caller may block, wait for completions
//! with a timeout. A virtual bdev's channel uses [`super::Lower`] instead: having
//! accepted its caller's request, it queues every request the channel below refuses.
//!
//! No allocation per request: the completion vector is handed out by [`IoQueue::reap`]
//! and handed back with [`IoQueue::recycle`].

use std::time::{Duration, Instant};

use super::{Channel, IoCompletion, IoRequest};
use crate::uring::Ring;

/// The longest single sleep in the ring while waiting (a completion wakes it early).
const RING_NAP: Duration = Duration::from_millis(1);

/// A channel, the requests it holds and the one it handed back (see the module docs).
pub struct IoQueue {
    chan: Box<dyn Channel>,
    /// Requests submitted and not yet reaped, `held` included.
    in_flight: usize,
    /// The request the channel refused (back-pressure), sent again first.
    held: Option<IoRequest>,
    /// Completions reaped and not yet handed out, and the storage reused for them.
    done: Vec<IoCompletion>,
}

/// [`IoQueue::drain`] gave up with requests still in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{in_flight} requests still in flight after {waited:?}")]
pub struct DrainTimeout {
    pub in_flight: usize,
    pub waited: Duration,
}

impl IoQueue {
    pub fn new(chan: Box<dyn Channel>) -> IoQueue {
        IoQueue {
            chan,
            in_flight: 0,
            held: None,
            done: Vec::new(),
        }
    }

    /// Requests submitted and not yet reaped, including a held one.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The channel refused a request, which the queue holds: submit nothing new
    /// until [`IoQueue::reap`] (or [`IoQueue::wait`]) has sent it again.
    pub fn is_blocked(&self) -> bool {
        self.held.is_some()
    }

    /// Sends `req` down. `Ok` means the queue has it: either the channel took it, or
    /// the channel refused it and the queue holds it ([`IoQueue::is_blocked`] is then
    /// true). `Err(req)` hands it back untouched when the queue already holds one.
    pub fn submit(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if self.held.is_some() {
            return Err(req);
        }
        if let Err(r) = self.chan.submit(req) {
            self.held = Some(r);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Sends the held request again; true when the channel took it now.
    fn resend(&mut self) -> bool {
        match self.held.take() {
            None => false,
            Some(r) => match self.chan.submit(r) {
                Ok(()) => true,
                Err(r) => {
                    self.held = Some(r);
                    false
                }
            },
        }
    }

    /// Gives up the held request (the caller will answer nothing more); it no longer
    /// counts as in flight.
    pub fn take_held(&mut self) -> Option<IoRequest> {
        let r = self.held.take()?;
        self.in_flight -= 1;
        Some(r)
    }

    /// Sends the held request again (first, before anything new), polls the channel
    /// once and hands out every completion reaped so far. Give the vector back with
    /// [`IoQueue::recycle`] so its storage is reused.
    pub fn reap(&mut self) -> Vec<IoCompletion> {
        self.resend();
        self.poll_chan();
        std::mem::take(&mut self.done)
    }

    /// Returns a vector from [`IoQueue::reap`] or [`IoQueue::wait`]; completions still
    /// in it come back from the next reap.
    pub fn recycle(&mut self, v: Vec<IoCompletion>) {
        if self.done.is_empty() {
            self.done = v;
        } else {
            // `reap` ran in between; keep the older ones first.
            let newer = std::mem::replace(&mut self.done, v);
            self.done.extend(newer);
        }
    }

    fn poll_chan(&mut self) -> usize {
        let before = self.done.len();
        self.chan.poll(&mut self.done);
        let n = self.done.len() - before;
        debug_assert!(n <= self.in_flight, "a channel completed more than it was given");
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    /// Blocks until at least `min` completions are reaped, nothing is in flight, or
    /// `timeout` has passed, whichever comes first, sending the held request again on
    /// the way; returns what was reaped (compare its length with `min`). With `ring`
    /// (a thread that owns the ring: the fio engine), a round that found nothing
    /// sleeps in the ring while it has I/O in flight; otherwise it yields the CPU.
    pub fn wait(&mut self, min: usize, timeout: Duration, ring: Option<&Ring>) -> Vec<IoCompletion> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            self.resend();
            let n = self.poll_chan();
            if self.done.len() >= min || self.in_flight == 0 {
                break;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break;
            }
            if n > 0 {
                continue;
            }
            match ring {
                Some(r) if r.in_flight() > 0 => {
                    let nap = deadline.map_or(RING_NAP, |d| RING_NAP.min(d - now));
                    let _ = r.wait(nap);
                }
                _ => std::thread::yield_now(),
            }
        }
        std::mem::take(&mut self.done)
    }

    /// Waits (as [`IoQueue::wait`]) until nothing is in flight and returns every
    /// completion. After `timeout` it fails; what was reaped until then comes back
    /// from the next reap.
    pub fn drain(&mut self, timeout: Duration, ring: Option<&Ring>) -> Result<Vec<IoCompletion>, DrainTimeout> {
        let t = Instant::now();
        let v = self.wait(usize::MAX, timeout, ring);
        if self.in_flight == 0 {
            return Ok(v);
        }
        self.recycle(v);
        Err(DrainTimeout {
            in_flight: self.in_flight,
            waited: t.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use crate::bdev::IoOp;

    /// A channel that refuses while `refuse` > 0 (counting down) and completes what
    /// it takes on the next poll, or never when `stuck`.
    #[derive(Default)]
    struct Script {
        refuse: usize,
        stuck: bool,
        taken: Vec<u64>,
        pending: Vec<u64>,
    }

    struct Fake(Rc<RefCell<Script>>);

    impl Channel for Fake {
        fn submit(&mut self, req: IoRequest) -> Result<(), IoRequest> {
            let mut s = self.0.borrow_mut();
            if s.refuse > 0 {
                s.refuse -= 1;
                return Err(req);
            }
            s.taken.push(req.tag);
            s.pending.push(req.tag);
            Ok(())
        }
        fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
            let mut s = self.0.borrow_mut();
            if s.stuck {
                return 0;
            }
            let n = s.pending.len();
            out.extend(s.pending.drain(..).map(|tag| IoCompletion {
                tag,
                op: IoOp::Flush,
                result: Ok(()),
                buf: None,
            }));
            n
        }
        fn in_flight(&self) -> usize {
            self.0.borrow().pending.len()
        }
    }

    fn queue(s: Script) -> (IoQueue, Rc<RefCell<Script>>) {
        let s = Rc::new(RefCell::new(s));
        (IoQueue::new(Box::new(Fake(s.clone()))), s)
    }

    /// The tags in `v`, which it empties (for `recycle`).
    fn tags(v: &mut Vec<IoCompletion>) -> Vec<u64> {
        v.drain(..).map(|c| c.tag).collect()
    }

    #[test]
    fn a_refused_request_is_held_and_goes_first() {
        let (mut q, s) = queue(Script {
            refuse: 2,
            ..Script::default()
        });
        q.submit(IoRequest::flush(1)).unwrap();
        assert!(q.is_blocked());
        assert_eq!(q.in_flight(), 1, "the held request counts as in flight");
        // While one is held, a new one comes back untouched and nothing changes.
        let back = q.submit(IoRequest::flush(2)).unwrap_err();
        assert_eq!(back.tag, 2);
        assert_eq!(q.in_flight(), 1);
        let v = q.reap();
        assert!(v.is_empty());
        q.recycle(v);
        assert!(q.is_blocked(), "the channel still refuses");
        let mut v = q.reap();
        assert!(!q.is_blocked());
        assert_eq!(tags(&mut v), vec![1], "sent again, then reaped");
        q.recycle(v);
        q.submit(IoRequest::flush(2)).unwrap();
        assert_eq!(s.borrow().taken, vec![1, 2], "the held request went down first");
        assert_eq!(q.in_flight(), 1);
        let mut v = q.reap();
        assert_eq!(tags(&mut v), vec![2]);
        assert_eq!(q.in_flight(), 0);
        q.recycle(v);
    }

    #[test]
    fn wait_resends_the_held_request_and_counts_down() {
        let (mut q, s) = queue(Script {
            refuse: 3,
            ..Script::default()
        });
        q.submit(IoRequest::flush(7)).unwrap();
        let mut v = q.wait(1, Duration::from_secs(5), None);
        assert_eq!(tags(&mut v), vec![7]);
        assert_eq!(s.borrow().taken, vec![7]);
        assert_eq!(q.in_flight(), 0);
        assert!(!q.is_blocked());
    }

    #[test]
    fn completions_left_in_a_recycled_vector_come_back() {
        let (mut q, _s) = queue(Script::default());
        for t in 0..3 {
            q.submit(IoRequest::flush(t)).unwrap();
        }
        let mut v = q.reap();
        let first = v.remove(0);
        assert_eq!(first.tag, 0);
        q.recycle(v);
        q.submit(IoRequest::flush(3)).unwrap();
        let mut v = q.drain(Duration::from_secs(5), None).unwrap();
        assert_eq!(tags(&mut v), vec![1, 2, 3]);
    }

    #[test]
    fn wait_and_drain_time_out_and_keep_what_they_reaped() {
        let (mut q, s) = queue(Script::default());
        q.submit(IoRequest::flush(1)).unwrap();
        let mut v = q.reap();
        assert_eq!(tags(&mut v), vec![1]);
        q.recycle(v);
        s.borrow_mut().stuck = true;
        q.submit(IoRequest::flush(2)).unwrap();
        let t = Instant::now();
        let v = q.wait(1, Duration::from_millis(30), None);
        assert!(v.is_empty());
        assert!(t.elapsed() >= Duration::from_millis(30));
        q.recycle(v);
        let e = q.drain(Duration::from_millis(20), None).unwrap_err();
        assert_eq!(e.in_flight, 1);
        assert!(e.waited >= Duration::from_millis(20));
        assert_eq!(e.to_string().split(' ').next(), Some("1"));
        s.borrow_mut().stuck = false;
        let mut v = q.drain(Duration::from_secs(5), None).unwrap();
        assert_eq!(tags(&mut v), vec![2]);
    }

    #[test]
    fn a_given_up_held_request_no_longer_counts() {
        let (mut q, s) = queue(Script {
            refuse: 1,
            ..Script::default()
        });
        q.submit(IoRequest::flush(4)).unwrap();
        assert_eq!(q.take_held().map(|r| r.tag), Some(4));
        assert_eq!(q.in_flight(), 0);
        assert!(q.take_held().is_none());
        let v = q.drain(Duration::from_millis(1), None).unwrap();
        assert!(v.is_empty());
        assert!(s.borrow().taken.is_empty());
    }
}
