//! NBD wire format: constants and the (pure, fuzzable) parsers of what a
//! client sends. Numbers are big-endian on the wire. Reference: the NBD
//! protocol document (`doc/proto.md` of the NetworkBlockDevice/nbd project).

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (`NBD_OPT_STRUCTURED_REPLY`).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// The last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Block status flags of `base:allocation`.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// The one metadata context served.
pub const META_BASE_ALLOCATION: &[u8] = b"base:allocation";
/// Its id in this server's replies.
pub const META_ID_BASE_ALLOCATION: u32 = 1;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_RESIZE: u16 = 1 << 9;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// The server requires TLS first (`NBD_OPT_STARTTLS`).
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Errors (values are fixed by the protocol, not the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const REPLY_LEN: usize = 16;

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Why a request header is unusable: the stream cannot be trusted any more,
/// so the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic(pub u32);

/// Parse one request header from the first [`REQUEST_LEN`] bytes of `b`
/// (`None`: not enough bytes yet).
pub fn parse_request(b: &[u8]) -> Option<Result<Request, BadMagic>> {
    if b.len() < REQUEST_LEN {
        return None;
    }
    let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Some(Err(BadMagic(magic)));
    }
    Some(Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
        cmd: u16::from_be_bytes(b[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    }))
}

/// Encode a request header (the inverse of [`parse_request`]; clients and tests).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// The range check of a request: offset and length multiples of `block_size`, and
/// `offset + len` (without overflow) within `capacity`. `Err(nbd errno)`: `EINVAL` when
/// misaligned, `past_end` when past the end (the protocol wants `EINVAL` for reads and
/// trims, `ENOSPC` for writes).
pub fn check_range(r: &Request, block_size: u64, capacity: u64, past_end: u32) -> Result<(), u32> {
    let len = r.len as u64;
    if block_size == 0 || !r.offset.is_multiple_of(block_size) || !len.is_multiple_of(block_size) {
        return Err(EINVAL);
    }
    match r.offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(past_end),
    }
}

/// Size of a client option header: `IHAVEOPT`, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;

/// Why a client option header is unusable; the server closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadOption {
    /// The frame does not start with `IHAVEOPT`.
    Magic(u64),
    /// The option data is longer than the server accepts.
    TooLong(u32),
}

/// Parse a client option header (the first [`OPTION_HEADER_LEN`] bytes of `b`) into
/// (option, data length); `None`: not enough bytes yet.
pub fn parse_option_header(b: &[u8], max_data: u32) -> Option<Result<(u32, u32), BadOption>> {
    let h = b.get(..OPTION_HEADER_LEN)?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
    if magic != IHAVEOPT {
        return Some(Err(BadOption::Magic(magic)));
    }
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
    if len > max_data {
        return Some(Err(BadOption::TooLong(len)));
    }
    Some(Ok((opt, len)))
}

/// One client option frame, borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionFrame<'a> {
    pub opt: u32,
    pub data: &'a [u8],
    /// Bytes of input the frame took (header and data).
    pub used: usize,
}

/// Parse one whole client option frame from `b`; `None`: not enough bytes yet.
pub fn parse_option(b: &[u8], max_data: u32) -> Option<Result<OptionFrame<'_>, BadOption>> {
    let (opt, len) = match parse_option_header(b, max_data)? {
        Ok(x) => x,
        Err(e) => return Some(Err(e)),
    };
    let used = OPTION_HEADER_LEN + len as usize;
    let data = b.get(OPTION_HEADER_LEN..used)?;
    Some(Ok(OptionFrame { opt, data, used }))
}

/// Encode a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; REPLY_LEN] {
    let mut h = [0u8; REPLY_LEN];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// Encode an option reply header followed by `data`.
pub fn option_reply(opt: u32, rep: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&rep.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Encode a structured reply chunk header (the payload follows).
pub fn chunk_header(flags: u16, ty: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&ty.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&length.to_be_bytes());
    h
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: export
/// name and queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: Vec<u8>,
    pub queries: Vec<Vec<u8>>,
}

/// Parse meta context option data; `None` if the lengths inside do not add up.
pub fn parse_meta_request(d: &[u8]) -> Option<MetaRequest> {
    let nlen = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(nlen)?)?.to_vec();
    let mut rest = &d[4 + nlen..];
    let n = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..n {
        let l = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
        queries.push(rest.get(4..4usize.checked_add(l)?)?.to_vec());
        rest = &rest[4 + l..];
    }
    if !rest.is_empty() {
        return None;
    }
    Some(MetaRequest { name, queries })
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and the info
/// types the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub infos: Vec<u16>,
}

/// Parse the data of `NBD_OPT_INFO` / `NBD_OPT_GO`; `None` if the lengths
/// inside do not add up to the option length.
pub fn parse_info_request(d: &[u8]) -> Option<InfoRequest> {
    let nlen = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(nlen)?)?.to_vec();
    let rest = &d[4 + nlen..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != n * 2 {
        return None;
    }
    let infos = list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Some(InfoRequest { name, infos })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let mut b = Vec::new();
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b.extend_from_slice(&CMD_WRITE.to_be_bytes());
        b.extend_from_slice(&0x1122334455667788u64.to_be_bytes());
        b.extend_from_slice(&4096u64.to_be_bytes());
        b.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_request(&b[..27]), None);
        let r = parse_request(&b).unwrap().unwrap();
        assert_eq!(
            (r.flags, r.cmd, r.cookie, r.offset, r.len),
            (1, 1, 0x1122334455667788, 4096, 512)
        );
        b[0] = 0;
        assert!(matches!(parse_request(&b), Some(Err(BadMagic(_)))));
    }

    #[test]
    fn info_request_lengths_must_add_up() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!((r.name.as_slice(), r.infos.as_slice()), (&b"abc"[..], &[3u16][..]));
        assert!(parse_info_request(&d[..d.len() - 1]).is_none());
        let mut huge = d.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&huge).is_none());
        assert!(parse_info_request(&[]).is_none());
    }
}
