//! The backend's queue statements as text, so that the compare bench's plain tokio-postgres
//! client runs exactly what the backend runs and the two stay comparable when a statement
//! changes. Not API: hidden from the documentation, no stability promised.

/// The statements a q1 message goes through, for tables in `schema`.
#[derive(Debug)]
pub struct QueueStatements {
    /// `$1` topic id, `$2` payloads, `$3` properties (JSON text), `$4` keys, `$5` de-duplication
    /// ids, `$6` channel, `$7` `synchronous_commit` or NULL → `(seq, dedup_id)` per row stored.
    pub publish: String,
    /// `$1` subscription id, `$2` limit, `$3` visibility (ms), `$4` consumer token, `$5`
    /// `synchronous_commit` → `(seq, redelivery_count, payload, properties, key, created µs)`.
    pub claim: String,
    /// `$1` subscription id, `$2` seqs, `$3` `synchronous_commit`.
    pub ack: String,
}

/// The statements for tables in `schema` (a valid schema name: the backend's configuration checks
/// it).
pub fn queue(schema: &str) -> QueueStatements {
    let sql = crate::sql::Sql::new(schema);
    QueueStatements {
        publish: sql.publish,
        claim: sql.claim,
        ack: sql.ack,
    }
}
