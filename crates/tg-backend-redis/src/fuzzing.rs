//! What the fuzz targets of the repository's `fuzz/` crate reach: the decoders of what this
//! backend reads from the server (stream entries of an `XREADGROUP` reply, their ids, q0 pub/sub
//! frames) and the encoders that write them. It exists for the fuzz targets only: it is not API,
//! hidden from the docs, and may change in any release.

pub use redis;

pub use crate::acks::EntryRef;
pub use crate::entry::{
    as_bytes, decode_entry, field, format_id, ms_time, parse_id, push_fields, reply_streams, Entry,
    EntryId, IdBuf, IdFormatter, Malformed,
};
pub use crate::frame::{decode_frame, Frame, FrameArg, FRAME_V1};
pub use crate::record::{encode_record, Record};
