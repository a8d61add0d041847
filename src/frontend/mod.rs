//! Frontends: how clients reach the disks on the data path.
//!
//! * [`nbd`]: a Network Block Device server (fixed newstyle handshake,
//!   simple replies), one connection per reactor, socket I/O on the
//!   reactor's io_uring. See `docs/nbd.md`.
//!
//! The fio external engine lives in its own cdylib crate (`fio-engine/`).

pub(crate) mod nbd;
pub(crate) mod vhost;
