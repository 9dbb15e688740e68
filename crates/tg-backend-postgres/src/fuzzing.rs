//! What the fuzz targets of the repository's `fuzz/` crate reach: the decoders of what this
//! backend reads from PostgreSQL (a stored row's properties, q0 notification payloads) and the
//! encoders that write them. It exists for the fuzz targets only: it is not API, hidden from the
//! docs, and may change in any release.

pub use crate::properties::{read as read_properties, to_json as properties_to_json, Read};
pub use crate::q0::{
    decode as decode_notification, encode as encode_notification, Decoded, NOTIFY_MAX,
    Q0_MAX_PAYLOAD,
};
