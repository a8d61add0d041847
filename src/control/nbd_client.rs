//! A small NBD client, for MigrateDisk's NBD sources (`nbd+unix:///EXPORT?socket=PATH`,
//! `nbd://HOST[:PORT]/EXPORT`): the fixed-newstyle handshake, `NBD_OPT_GO`, structured
//! replies and `base:allocation` block status when the server offers them, and reads
//! with several requests in flight on one connection. Read-only: it never sends a write.
//!
//! It runs on a MigrateDisk task's reader thread (blocking sockets with timeouts), never
//! on a reactor.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::frontend::nbd::proto::*;

/// Requests in flight per [`NbdClient::read`].
const IN_FLIGHT: usize = 16;
/// Largest single read request.
const READ_MAX: u32 = 1 << 20;
/// Socket timeouts: a server silent this long has failed.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// A server that does not greet (or answer an option) within this has failed.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);
/// Default NBD TCP port.
const DEFAULT_PORT: u16 = 10809;

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NbdAddr {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
}

/// Why talking to an NBD server failed.
#[derive(Debug)]
pub(crate) enum NbdError {
    /// The URI is not one this client reads.
    BadUri(String),
    /// No connection (refused, no such socket, timeout).
    Connect(std::io::Error),
    /// The server broke the protocol or closed the connection.
    Protocol(String),
    /// The server refused the export (`NBD_OPT_GO` error reply).
    Refused {
        export: String,
        reply: u32,
        message: String,
    },
    /// A read or block-status request failed on the server (NBD errno).
    Request { offset: u64, errno: u32, message: String },
    /// Socket I/O failed mid-transmission.
    Io(std::io::Error),
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::BadUri(m) => f.write_str(m),
            NbdError::Connect(e) => write!(f, "cannot connect: {e}"),
            NbdError::Protocol(m) => write!(f, "protocol error: {m}"),
            NbdError::Refused { export, reply, message } => {
                write!(f, "the server refused export {export:?} (reply {reply:#x}")?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                f.write_str(")")
            }
            NbdError::Request { offset, errno, message } => {
                write!(f, "request at offset {offset} failed with NBD error {errno}")?;
                if !message.is_empty() {
                    write!(f, " ({message})")?;
                }
                Ok(())
            }
            NbdError::Io(e) => write!(f, "I/O: {e}"),
        }
    }
}

impl std::error::Error for NbdError {}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> Self {
        NbdError::Io(e)
    }
}

fn percent_decode(s: &str) -> Result<String, NbdError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| NbdError::BadUri(format!("bad percent escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| NbdError::BadUri(format!("{s:?} is not UTF-8 once decoded")))
}

/// Parses `nbd+unix:///EXPORT?socket=PATH` and `nbd://HOST[:PORT]/EXPORT` (IPv6 hosts in
/// brackets). TLS (`nbds://`) and other query parameters are refused.
pub(crate) fn parse_uri(s: &str) -> Result<NbdUri, NbdError> {
    let bad = |why: &str| NbdError::BadUri(format!("NBD URI {s:?}: {why}"));
    if let Some(rest) = s.strip_prefix("nbd+unix://") {
        let rest = rest
            .strip_prefix('/')
            .ok_or_else(|| bad("a unix socket URI has no host: nbd+unix:///EXPORT?socket=PATH"))?;
        let (export, query) = rest.split_once('?').ok_or_else(|| bad("no ?socket=PATH"))?;
        let mut socket = None;
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(percent_decode(p)?)),
                _ => return Err(bad(&format!("unknown query parameter {kv:?} (only socket=PATH)"))),
            }
        }
        let socket = socket.ok_or_else(|| bad("no ?socket=PATH"))?;
        return Ok(NbdUri {
            addr: NbdAddr::Unix(socket),
            export: percent_decode(export)?,
        });
    }
    if let Some(rest) = s.strip_prefix("nbd://") {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        if export.contains('?') {
            return Err(bad("query parameters are not supported for nbd://"));
        }
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, after) = h.split_once(']').ok_or_else(|| bad("unclosed [ in the host"))?;
            (h.to_owned(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (hostport.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p.parse().map_err(|_| bad(&format!("port {p:?} is not a number")))?,
        };
        return Ok(NbdUri {
            addr: NbdAddr::Tcp { host, port },
            export: percent_decode(export)?,
        });
    }
    Err(bad(
        "expected nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT (no TLS)",
    ))
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// One connection in transmission phase.
pub(crate) struct NbdClient {
    s: Stream,
    size: u64,
    structured: bool,
    /// The `base:allocation` context id, if the server agreed to it.
    alloc_ctx: Option<u32>,
    max_read: u32,
    next_cookie: u64,
    /// The handshake ended: the connection is in transmission.
    ready: bool,
    /// Where it connected (none: a test's socket pair).
    uri: Option<NbdUri>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl NbdClient {
    /// Connects and negotiates `uri`'s export.
    pub(crate) fn connect(uri: &NbdUri) -> Result<NbdClient, NbdError> {
        NbdClient::connect_within(uri, GREETING_TIMEOUT)
    }

    /// [`NbdClient::connect`], the handshake's replies awaited at most `greeting` each
    /// (a server at its client limit accepts the connection but never greets).
    fn connect_within(uri: &NbdUri, greeting: Duration) -> Result<NbdClient, NbdError> {
        let s = match &uri.addr {
            NbdAddr::Unix(p) => {
                let s = UnixStream::connect(p).map_err(NbdError::Connect)?;
                s.set_read_timeout(Some(greeting)).map_err(NbdError::Connect)?;
                s.set_write_timeout(Some(IO_TIMEOUT)).map_err(NbdError::Connect)?;
                Stream::Unix(s)
            }
            NbdAddr::Tcp { host, port } => {
                use std::net::ToSocketAddrs;
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(NbdError::Connect)?
                    .collect();
                let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
                let mut conn = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                        Ok(s) => {
                            conn = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = conn.ok_or(NbdError::Connect(last))?;
                s.set_read_timeout(Some(greeting)).map_err(NbdError::Connect)?;
                s.set_write_timeout(Some(IO_TIMEOUT)).map_err(NbdError::Connect)?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        };
        let mut c = NbdClient {
            s,
            size: 0,
            structured: false,
            alloc_ctx: None,
            max_read: READ_MAX,
            next_cookie: 1,
            ready: false,
            uri: Some(uri.clone()),
        };
        c.handshake(&uri.export).map_err(|e| match e {
            // A server that hangs up or says nothing during the greeting is not an NBD
            // server we can use: report it as a failed connection.
            NbdError::Io(io) => NbdError::Connect(io),
            e => e,
        })?;
        match &c.s {
            Stream::Unix(s) => s.set_read_timeout(Some(IO_TIMEOUT)),
            Stream::Tcp(s) => s.set_read_timeout(Some(IO_TIMEOUT)),
        }
        .map_err(NbdError::Connect)?;
        Ok(c)
    }

    /// Negotiates `export` over a connected unix stream (tests: a scripted server).
    #[cfg(test)]
    fn over_unix(s: UnixStream, export: &str) -> Result<NbdClient, NbdError> {
        let mut c = NbdClient {
            s: Stream::Unix(s),
            size: 0,
            structured: false,
            alloc_ctx: None,
            max_read: READ_MAX,
            next_cookie: 1,
            ready: false,
            uri: None,
        };
        c.handshake(export)?;
        Ok(c)
    }

    /// Another connection to the same export (for reads in parallel); it must have the
    /// same size.
    pub(crate) fn reconnect(&self) -> Result<NbdClient, NbdError> {
        let uri = self
            .uri
            .as_ref()
            .ok_or_else(|| NbdError::BadUri("this connection has no URI to connect again".into()))?;
        let c = NbdClient::connect_within(uri, Duration::from_secs(1))?;
        if c.size != self.size {
            return Err(NbdError::Protocol(format!(
                "the export's size changed from {} to {} bytes",
                self.size, c.size
            )));
        }
        Ok(c)
    }

    /// Export size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server answers `base:allocation` block status.
    #[cfg(test)]
    pub(crate) fn has_block_status(&self) -> bool {
        self.alloc_ctx.is_some()
    }

    fn handshake(&mut self, export: &str) -> Result<(), NbdError> {
        let mut h = [0u8; 18];
        self.s.read_exact(&mut h)?;
        if be64(&h) != NBD_MAGIC {
            return Err(NbdError::Protocol("not an NBD server (no NBDMAGIC)".into()));
        }
        if be64(&h[8..]) != IHAVEOPT {
            return Err(NbdError::Protocol(
                "the server speaks the old-style handshake; only fixed newstyle is supported".into(),
            ));
        }
        let flags = be16(&h[16..]);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol("the server does not offer fixed newstyle".into()));
        }
        let mut cf = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            cf |= FLAG_C_NO_ZEROES;
        }
        self.s.write_all(&cf.to_be_bytes())?;

        // Structured replies, then base:allocation (needs them).
        self.option(OPT_STRUCTURED_REPLY, &[])?;
        let (t, _) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        self.structured = t == REP_ACK;
        if self.structured {
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend_from_slice(META_BASE_ALLOCATION);
            self.option(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (t, data) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match t {
                    REP_META_CONTEXT if data.len() >= 4 && &data[4..] == META_BASE_ALLOCATION => {
                        self.alloc_ctx = Some(be32(&data));
                    }
                    REP_ACK => break,
                    t if t & (1 << 31) != 0 => break, // refused: read everything
                    _ => {}
                }
            }
        }

        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.option(OPT_GO, &d)?;
        let mut got_size = false;
        loop {
            let (t, data) = self.option_reply(OPT_GO)?;
            match t {
                REP_INFO if data.len() >= 2 => match be16(&data) {
                    INFO_EXPORT if data.len() >= 12 => {
                        self.size = be64(&data[2..]);
                        got_size = true;
                    }
                    INFO_BLOCK_SIZE if data.len() >= 14 => {
                        let max = be32(&data[10..]);
                        if max >= 4096 {
                            self.max_read = self.max_read.min(max);
                        }
                    }
                    _ => {}
                },
                REP_ACK => break,
                t if t & (1 << 31) != 0 => {
                    return Err(NbdError::Refused {
                        export: export.to_owned(),
                        reply: t,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    })
                }
                _ => {}
            }
        }
        if !got_size {
            return Err(NbdError::Protocol("NBD_OPT_GO ended without the export's size".into()));
        }
        self.ready = true;
        Ok(())
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m)?;
        Ok(())
    }

    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut r = [0u8; 20];
        self.s.read_exact(&mut r)?;
        if be64(&r) != OPT_REPLY_MAGIC {
            return Err(NbdError::Protocol("bad option reply magic".into()));
        }
        if be32(&r[8..]) != opt {
            return Err(NbdError::Protocol(format!(
                "option reply for option {} while negotiating {opt}",
                be32(&r[8..])
            )));
        }
        let len = be32(&r[16..]) as usize;
        if len > 64 << 10 {
            return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
        }
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d)?;
        Ok((be32(&r[12..]), d))
    }

    fn request(&mut self, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(REQUEST_LEN);
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m
    }

    /// Reads `buf.len()` bytes at `offset` (within the export), up to [`IN_FLIGHT`]
    /// requests on the wire at once.
    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        if offset + buf.len() as u64 > self.size {
            return Err(NbdError::Protocol(format!(
                "read of {} bytes at {offset} past the export's end ({})",
                buf.len(),
                self.size
            )));
        }
        let pieces: Vec<(u64, u32)> = (0..buf.len() as u64)
            .step_by(self.max_read as usize)
            .map(|p| (p, (self.max_read as u64).min(buf.len() as u64 - p) as u32))
            .collect();
        let base = self.next_cookie;
        self.next_cookie += pieces.len() as u64;
        let mut sent = 0;
        let mut done = 0;
        let mut open: Vec<bool> = vec![false; pieces.len()];
        while done < pieces.len() {
            // Fill the window.
            let mut out = Vec::new();
            while sent < pieces.len() && sent - done < IN_FLIGHT {
                let (p, n) = pieces[sent];
                out.extend(self.request(CMD_READ, base + sent as u64, offset + p, n));
                open[sent] = true;
                sent += 1;
            }
            if !out.is_empty() {
                self.s.write_all(&out)?;
            }
            // One reply (or one chunk).
            let (i, finished) = self.read_reply(base, &pieces, offset, buf, &open)?;
            if finished {
                open[i] = false;
                done += 1;
            }
        }
        Ok(())
    }

    /// Reads one simple reply or one structured chunk for one of the read `pieces`
    /// (cookies `base + i`) and stores its data in `buf`; returns the piece's index and
    /// whether its request is complete.
    fn read_reply(
        &mut self,
        base: u64,
        pieces: &[(u64, u32)],
        offset: u64,
        buf: &mut [u8],
        open: &[bool],
    ) -> Result<(usize, bool), NbdError> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        let piece = |cookie: u64| -> Result<usize, NbdError> {
            let i = cookie.wrapping_sub(base) as usize;
            if cookie < base || i >= pieces.len() || !open[i] {
                return Err(NbdError::Protocol(format!("reply for unknown request {cookie}")));
            }
            Ok(i)
        };
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let mut r = [0u8; 12];
                self.s.read_exact(&mut r)?;
                let i = piece(be64(&r[4..]))?;
                let err = be32(&r);
                if err != 0 {
                    return Err(NbdError::Request {
                        offset: offset + pieces[i].0,
                        errno: err,
                        message: String::new(),
                    });
                }
                let (p, n) = pieces[i];
                self.s.read_exact(&mut buf[p as usize..p as usize + n as usize])?;
                Ok((i, true))
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut r = [0u8; 16];
                self.s.read_exact(&mut r)?;
                let (flags, ty, cookie, len) = (be16(&r), be16(&r[2..]), be64(&r[4..]), be32(&r[12..]) as usize);
                let i = piece(cookie)?;
                let (p, n) = pieces[i];
                let (lo, hi) = (offset + p, offset + p + n as u64);
                match ty {
                    REPLY_TYPE_NONE if len == 0 => {}
                    REPLY_TYPE_OFFSET_DATA if len >= 8 => {
                        let mut o = [0u8; 8];
                        self.s.read_exact(&mut o)?;
                        let at = be64(&o);
                        let dlen = (len - 8) as u64;
                        if at < lo || at + dlen > hi {
                            return Err(NbdError::Protocol(format!(
                                "data chunk {at}+{dlen} outside the request {lo}..{hi}"
                            )));
                        }
                        let s = (at - offset) as usize;
                        self.s.read_exact(&mut buf[s..s + dlen as usize])?;
                    }
                    REPLY_TYPE_OFFSET_HOLE if len == 12 => {
                        let mut o = [0u8; 12];
                        self.s.read_exact(&mut o)?;
                        let (at, hl) = (be64(&o), be32(&o[8..]) as u64);
                        if at < lo || at + hl > hi {
                            return Err(NbdError::Protocol(format!(
                                "hole chunk {at}+{hl} outside the request {lo}..{hi}"
                            )));
                        }
                        let s = (at - offset) as usize;
                        buf[s..s + hl as usize].fill(0);
                    }
                    t if t & (1 << 15) != 0 && len >= 6 => {
                        let mut d = vec![0u8; len];
                        self.s.read_exact(&mut d)?;
                        let mlen = (be16(&d[4..]) as usize).min(len - 6);
                        return Err(NbdError::Request {
                            offset: lo,
                            errno: be32(&d),
                            message: String::from_utf8_lossy(&d[6..6 + mlen]).into_owned(),
                        });
                    }
                    t => {
                        return Err(NbdError::Protocol(format!(
                            "unexpected reply chunk type {t} ({len} bytes) to a read"
                        )))
                    }
                }
                Ok((i, flags & REPLY_FLAG_DONE != 0))
            }
            x => Err(NbdError::Protocol(format!("bad reply magic {x:#x}"))),
        }
    }

    /// Which parts of `offset..offset+len` may hold data: `(offset, len)` ranges, in
    /// order; the rest reads as zeros (`NBD_STATE_ZERO`). Without `base:allocation`,
    /// the whole range.
    pub(crate) fn data_extents(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, NbdError> {
        let end = (offset + len).min(self.size);
        let Some(ctx) = self.alloc_ctx else {
            return Ok(if end > offset {
                vec![(offset, end - offset)]
            } else {
                Vec::new()
            });
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(u32::MAX as u64 & !4095) as u32;
            let cookie = self.next_cookie;
            self.next_cookie += 1;
            let req = self.request(CMD_BLOCK_STATUS, cookie, pos, n);
            self.s.write_all(&req)?;
            let mut covered = pos;
            loop {
                let mut r = [0u8; 20];
                self.s.read_exact(&mut r)?;
                if be32(&r) == SIMPLE_REPLY_MAGIC {
                    // A simple reply to block status is an error (or a broken server).
                    let err = be32(&r[4..]);
                    return Err(NbdError::Request {
                        offset: pos,
                        errno: if err == 0 { EIO } else { err },
                        message: "block status answered with a simple reply".into(),
                    });
                }
                if be32(&r) != STRUCTURED_REPLY_MAGIC || be64(&r[8..]) != cookie {
                    return Err(NbdError::Protocol("unexpected reply to block status".into()));
                }
                let (flags, ty, clen) = (be16(&r[4..]), be16(&r[6..]), be32(&r[16..]) as usize);
                if clen > 16 << 20 {
                    return Err(NbdError::Protocol(format!("block status chunk of {clen} bytes")));
                }
                let mut d = vec![0u8; clen];
                self.s.read_exact(&mut d)?;
                match ty {
                    REPLY_TYPE_BLOCK_STATUS if clen >= 4 && be32(&d) == ctx => {
                        for e in d[4..].chunks_exact(8) {
                            let (elen, st) = (be32(e) as u64, be32(&e[4..]));
                            let (s, t) = (covered, (covered + elen).min(end));
                            if t <= s {
                                continue;
                            }
                            if st & STATE_ZERO == 0 {
                                match out.last_mut() {
                                    Some(l) if l.0 + l.1 == s => l.1 += t - s,
                                    _ => out.push((s, t - s)),
                                }
                            }
                            covered = t;
                        }
                    }
                    REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_NONE => {}
                    t if t & (1 << 15) != 0 && clen >= 6 => {
                        let mlen = (be16(&d[4..]) as usize).min(clen - 6);
                        return Err(NbdError::Request {
                            offset: pos,
                            errno: be32(&d),
                            message: String::from_utf8_lossy(&d[6..6 + mlen]).into_owned(),
                        });
                    }
                    t => return Err(NbdError::Protocol(format!("unexpected chunk type {t} to block status"))),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
            if covered == pos {
                return Err(NbdError::Protocol(format!("block status at {pos} described nothing")));
            }
            pos = covered;
        }
        Ok(out)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if !self.ready {
            // Mid-handshake: leave the option phase politely, then close.
            let _ = self.option(OPT_ABORT, &[]);
            return;
        }
        let c = self.next_cookie;
        let m = self.request(CMD_DISC, c, 0, 0);
        let _ = self.s.write_all(&m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("nbd+unix:///disk0?socket=/run/a%20b.sock").unwrap(),
            NbdUri {
                addr: NbdAddr::Unix("/run/a b.sock".into()),
                export: "disk0".into()
            }
        );
        assert_eq!(
            parse_uri("nbd://10.0.0.5:10810/vol").unwrap(),
            NbdUri {
                addr: NbdAddr::Tcp {
                    host: "10.0.0.5".into(),
                    port: 10810
                },
                export: "vol".into()
            }
        );
        assert_eq!(
            parse_uri("nbd://[::1]/").unwrap().addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(parse_uri("nbd://host").unwrap().export, "");
        for bad in [
            "nbds://h/e",
            "nbd+unix://h/e?socket=/s",
            "nbd+unix:///e",
            "nbd+unix:///e?socket=/s&tls=1",
            "nbd://:1/e",
            "nbd://h:x/e",
            "nbd://h/e?x=1",
            "/tmp/file",
            "nbd+unix:///%zz?socket=/s",
        ] {
            assert!(matches!(parse_uri(bad), Err(NbdError::BadUri(_))), "{bad}");
        }
    }

    /// A scripted server on the other end of a socket pair: the handshake (structured
    /// replies and base:allocation if `structured`, `go_error` refuses the export), then
    /// `serve` answers requests.
    fn server(
        structured: bool,
        go_error: bool,
        serve: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> (UnixStream, std::thread::JoinHandle<()>) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || {
            let mut out = NBD_MAGIC.to_be_bytes().to_vec();
            out.extend(IHAVEOPT.to_be_bytes());
            out.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            b.write_all(&out).unwrap();
            let mut cf = [0u8; 4];
            b.read_exact(&mut cf).unwrap();
            loop {
                let mut h = [0u8; 16];
                if b.read_exact(&mut h).is_err() {
                    return;
                }
                let opt = be32(&h[8..]);
                let mut d = vec![0u8; be32(&h[12..]) as usize];
                b.read_exact(&mut d).unwrap();
                let reply = |b: &mut UnixStream, t: u32, data: &[u8]| {
                    let mut r = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                    r.extend(opt.to_be_bytes());
                    r.extend(t.to_be_bytes());
                    r.extend((data.len() as u32).to_be_bytes());
                    r.extend(data);
                    b.write_all(&r).unwrap();
                };
                match opt {
                    OPT_STRUCTURED_REPLY if structured => reply(&mut b, REP_ACK, &[]),
                    OPT_STRUCTURED_REPLY => reply(&mut b, REP_ERR_UNSUP, &[]),
                    OPT_SET_META_CONTEXT => {
                        let mut m = 7u32.to_be_bytes().to_vec();
                        m.extend(META_BASE_ALLOCATION);
                        reply(&mut b, REP_META_CONTEXT, &m);
                        reply(&mut b, REP_ACK, &[]);
                    }
                    OPT_GO if go_error => {
                        reply(&mut b, REP_ERR_UNKNOWN, b"no such export");
                        // The client aborts the option phase.
                        let mut h = [0u8; 16];
                        b.read_exact(&mut h).unwrap();
                        assert_eq!(be32(&h[8..]), OPT_ABORT);
                        return;
                    }
                    OPT_GO => {
                        let mut i = INFO_EXPORT.to_be_bytes().to_vec();
                        i.extend((3u64 << 20).to_be_bytes());
                        i.extend((TF_HAS_FLAGS | TF_READ_ONLY).to_be_bytes());
                        reply(&mut b, REP_INFO, &i);
                        reply(&mut b, REP_ACK, &[]);
                        break;
                    }
                    _ => reply(&mut b, REP_ERR_UNSUP, &[]),
                }
            }
            serve(&mut b);
        });
        (a, h)
    }

    fn read_request(b: &mut UnixStream) -> (u16, u64, u64, u32) {
        let mut r = [0u8; REQUEST_LEN];
        b.read_exact(&mut r).unwrap();
        assert_eq!(be32(&r), REQUEST_MAGIC);
        (be16(&r[6..]), be64(&r[8..]), be64(&r[16..]), be32(&r[24..]))
    }

    fn chunk(cookie: u64, ty: u16, done: bool, payload: &[u8]) -> Vec<u8> {
        let mut c = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        c.extend((if done { REPLY_FLAG_DONE } else { 0 }).to_be_bytes());
        c.extend(ty.to_be_bytes());
        c.extend(cookie.to_be_bytes());
        c.extend((payload.len() as u32).to_be_bytes());
        c.extend(payload);
        c
    }

    #[test]
    fn structured_reads_holes_and_block_status() {
        let (a, h) = server(true, false, |b| {
            // Block status over 3 MiB: 1 MiB data, 1 MiB hole+zero, 1 MiB data.
            let (ty, cookie, off, len) = read_request(b);
            assert_eq!((ty, off, len), (CMD_BLOCK_STATUS, 0, 3 << 20));
            let mut p = 7u32.to_be_bytes().to_vec();
            for (l, st) in [(1u32 << 20, 0u32), (1 << 20, STATE_HOLE | STATE_ZERO), (1 << 20, 0)] {
                p.extend(l.to_be_bytes());
                p.extend(st.to_be_bytes());
            }
            b.write_all(&chunk(cookie, REPLY_TYPE_BLOCK_STATUS, true, &p)).unwrap();
            // A read of 8 KiB at 4 KiB: answered as a hole, then data, out of order.
            let (ty, cookie, off, len) = read_request(b);
            assert_eq!((ty, off, len), (CMD_READ, 4096, 8192));
            let mut d = (8192u64).to_be_bytes().to_vec();
            d.extend([0xabu8; 4096]);
            b.write_all(&chunk(cookie, REPLY_TYPE_OFFSET_DATA, false, &d)).unwrap();
            let mut hole = 4096u64.to_be_bytes().to_vec();
            hole.extend(4096u32.to_be_bytes());
            b.write_all(&chunk(cookie, REPLY_TYPE_OFFSET_HOLE, true, &hole))
                .unwrap();
            // A read answered with an error chunk.
            let (_, cookie, _, _) = read_request(b);
            let mut e = 5u32.to_be_bytes().to_vec();
            e.extend(3u16.to_be_bytes());
            e.extend(b"bad");
            b.write_all(&chunk(cookie, REPLY_TYPE_ERROR, true, &e)).unwrap();
            // A reply for a request never made.
            let _ = read_request(b);
            b.write_all(&chunk(999, REPLY_TYPE_NONE, true, &[])).unwrap();
        });
        let mut c = NbdClient::over_unix(a, "e").unwrap();
        assert_eq!(c.size(), 3 << 20);
        assert!(c.has_block_status());
        assert_eq!(
            c.data_extents(0, 3 << 20).unwrap(),
            vec![(0, 1 << 20), (2 << 20, 1 << 20)]
        );
        let mut buf = vec![0xeeu8; 8192];
        c.read(4096, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0) && buf[4096..].iter().all(|&x| x == 0xab));
        match c.read(0, &mut [0u8; 4096]) {
            Err(NbdError::Request { errno: 5, message, .. }) => assert_eq!(message, "bad"),
            r => panic!("{r:?}"),
        }
        assert!(matches!(c.read(0, &mut [0u8; 4096]), Err(NbdError::Protocol(_))));
        // Past the end: refused before anything is sent.
        assert!(matches!(c.read(3 << 20, &mut [0u8; 4096]), Err(NbdError::Protocol(_))));
        drop(c);
        h.join().unwrap();
    }

    #[test]
    fn simple_replies_without_structured_and_refusals() {
        let (a, h) = server(false, false, |b| {
            let (ty, cookie, off, len) = read_request(b);
            assert_eq!((ty, off, len), (CMD_READ, 0, 4096));
            let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend(0u32.to_be_bytes());
            r.extend(cookie.to_be_bytes());
            r.extend([7u8; 4096]);
            b.write_all(&r).unwrap();
        });
        let mut c = NbdClient::over_unix(a, "e").unwrap();
        assert!(!c.has_block_status());
        // No block status: everything may be data.
        assert_eq!(c.data_extents(0, 1 << 20).unwrap(), vec![(0, 1 << 20)]);
        let mut buf = vec![0u8; 4096];
        c.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 7));
        drop(c);
        h.join().unwrap();

        let (a, h) = server(true, true, |_| {});
        match NbdClient::over_unix(a, "nope") {
            Err(NbdError::Refused { export, message, .. }) => {
                assert_eq!(export, "nope");
                assert_eq!(message, "no such export");
            }
            r => panic!("{:?}", r.err()),
        }
        h.join().unwrap();

        // Not an NBD server.
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        assert!(matches!(NbdClient::over_unix(a, "e"), Err(NbdError::Protocol(_))));
    }
}
