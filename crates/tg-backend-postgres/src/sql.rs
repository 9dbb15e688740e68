//! Every SQL statement the backend runs. The only text ever spliced in is the configured schema
//! name (validated: `[a-z_][a-z0-9_]*`, quoted) and generated channel names (`tgps_` + hex);
//! topic names, subscription names, payloads and properties always travel as bind parameters.

/// Version of the table layout this library writes; a database with a newer one is refused.
pub(crate) const SCHEMA_VERSION: i32 = 1;

/// Advisory lock key serialising schema creation (`tgps` in ASCII).
pub(crate) const SCHEMA_LOCK: i64 = 0x7467_7073;

/// Advisory lock key serialising retention cleanup.
pub(crate) const CLEANUP_LOCK: i64 = 0x7467_7073_636c;

/// The statements, with the schema filled in.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) create: String,
    pub(crate) version: String,
    pub(crate) topic_id: String,
    pub(crate) subscription: String,
    pub(crate) replay: String,
    pub(crate) publish: String,
    pub(crate) dedup_lookup: String,
    pub(crate) claim: String,
    pub(crate) next_visible: String,
    pub(crate) ack: String,
    pub(crate) nack: String,
    pub(crate) release: String,
    pub(crate) unsubscribe: String,
    pub(crate) delete_topic: String,
    pub(crate) cleanup_consumed: String,
    pub(crate) cleanup_unconsumed: String,
}

impl Sql {
    pub(crate) fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        Self {
            create: format!(
                r#"
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.topics (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.messages (
    seq bigserial PRIMARY KEY,
    topic_id bigint NOT NULL,
    payload bytea NOT NULL,
    properties jsonb,
    key text,
    dedup_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS messages_topic_seq ON {s}.messages (topic_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedup ON {s}.messages (topic_id, dedup_id)
    WHERE dedup_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.subscriptions (
    id bigserial PRIMARY KEY,
    topic_id bigint NOT NULL,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic_id, name)
);
CREATE TABLE IF NOT EXISTS {s}.deliveries (
    sub_id bigint NOT NULL,
    seq bigint NOT NULL,
    visible_at timestamptz NOT NULL DEFAULT '-infinity',
    redelivery_count integer NOT NULL DEFAULT 0,
    claimed_by bigint,
    PRIMARY KEY (sub_id, seq)
) WITH (fillfactor = 70);
INSERT INTO {s}.meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}')
    ON CONFLICT (key) DO NOTHING;
"#
            ),
            version: format!("SELECT value FROM {s}.meta WHERE key = 'schema_version'"),
            // $1 name
            topic_id: format!(
                "WITH i AS (INSERT INTO {s}.topics (name) VALUES ($1) \
                   ON CONFLICT (name) DO NOTHING RETURNING id) \
                 SELECT id FROM i UNION ALL SELECT id FROM {s}.topics WHERE name = $1 LIMIT 1"
            ),
            // $1 topic_id, $2 name -> (id, created)
            subscription: format!(
                "WITH i AS (INSERT INTO {s}.subscriptions (topic_id, name) VALUES ($1, $2) \
                   ON CONFLICT (topic_id, name) DO NOTHING RETURNING id) \
                 SELECT id, true FROM i \
                 UNION ALL SELECT id, false FROM {s}.subscriptions WHERE topic_id = $1 AND name = $2 \
                 LIMIT 1"
            ),
            // $1 sub_id, $2 topic_id
            replay: format!(
                "INSERT INTO {s}.deliveries (sub_id, seq) \
                 SELECT $1, seq FROM {s}.messages WHERE topic_id = $2 ON CONFLICT DO NOTHING"
            ),
            // $1 topic_id, $2 payloads, $3 properties (json text), $4 keys, $5 dedup ids,
            // $6 channel, $7 synchronous_commit or NULL -> (seq, dedup_id) of the rows inserted
            publish: format!(
                "WITH cfg AS (SELECT set_config('synchronous_commit', \
                   coalesce($7::text, current_setting('synchronous_commit')), true) AS v), \
                 m AS ( \
                   INSERT INTO {s}.messages (topic_id, payload, properties, key, dedup_id) \
                   SELECT $1, u.p, u.pr::jsonb, u.k, u.d \
                   FROM unnest($2::bytea[], $3::text[], $4::text[], $5::text[]) AS u(p, pr, k, d) \
                   ON CONFLICT (topic_id, dedup_id) WHERE dedup_id IS NOT NULL DO NOTHING \
                   RETURNING seq, dedup_id \
                 ), d AS ( \
                   INSERT INTO {s}.deliveries (sub_id, seq) \
                   SELECT s.id, m.seq FROM {s}.subscriptions s CROSS JOIN m WHERE s.topic_id = $1 \
                 ) \
                 SELECT m.seq, m.dedup_id FROM m, cfg, (SELECT pg_notify($6, '')) AS n"
            ),
            // $1 topic_id, $2 dedup ids
            dedup_lookup: format!(
                "SELECT dedup_id, seq FROM {s}.messages WHERE topic_id = $1 AND dedup_id = ANY($2)"
            ),
            // $1 sub_id, $2 limit, $3 visibility ms, $4 token, $5 synchronous_commit
            claim: format!(
                // The claimed ids are collected first (an InitPlan, run once), and the UPDATE
                // then walks only their range of the subscription's index. The table's
                // statistics cannot be trusted to plan this: a queue analysed while drained
                // reads as empty however large its backlog has grown since, and a plan made
                // for an empty table (the UPDATE joining each row of the subscription against
                // the claim) reads the whole backlog per claim — quadratic in its size.
                "WITH cfg AS (SELECT set_config('synchronous_commit', $5, true) AS v), \
                 c AS ( \
                   SELECT ARRAY( \
                     SELECT d.seq FROM {s}.deliveries d \
                     WHERE d.sub_id = $1 AND d.visible_at <= now() \
                     ORDER BY d.seq LIMIT $2 \
                     FOR UPDATE SKIP LOCKED \
                   ) AS seqs \
                 ), u AS ( \
                   UPDATE {s}.deliveries d \
                   SET visible_at = now() + $3 * interval '1 millisecond', claimed_by = $4, \
                       redelivery_count = d.redelivery_count + (d.claimed_by IS NOT NULL)::int \
                   FROM cfg WHERE d.sub_id = $1 AND d.seq = ANY((SELECT seqs FROM c)::int8[]) \
                   AND d.seq BETWEEN (SELECT seqs[1] FROM c) \
                   AND (SELECT seqs[cardinality(seqs)] FROM c) \
                   RETURNING d.seq, d.redelivery_count \
                 ) \
                 SELECT u.seq, u.redelivery_count, m.payload, m.properties::text, m.key, \
                        (extract(epoch FROM m.created_at) * 1000000)::int8 \
                 FROM u JOIN {s}.messages m ON m.seq = u.seq ORDER BY u.seq"
            ),
            // $1 sub_id -> ms until the next claimed message becomes visible again
            next_visible: format!(
                "SELECT (extract(epoch FROM (min(visible_at) - now())) * 1000)::int8 \
                 FROM {s}.deliveries WHERE sub_id = $1 AND visible_at > now()"
            ),
            // $1 sub_id, $2 seqs, $3 synchronous_commit
            ack: format!(
                "WITH cfg AS (SELECT set_config('synchronous_commit', $3, true) AS v) \
                 DELETE FROM {s}.deliveries d USING cfg WHERE d.sub_id = $1 AND d.seq = ANY($2) \
                 AND d.seq BETWEEN (SELECT min(x) FROM unnest($2::int8[]) x) \
                 AND (SELECT max(x) FROM unnest($2::int8[]) x)"
            ),
            // $1 sub_id, $2 seqs, $3 token, $4 synchronous_commit, $5 channel
            nack: format!(
                "WITH cfg AS (SELECT set_config('synchronous_commit', $4, true) AS v), \
                 r AS ( \
                   UPDATE {s}.deliveries d SET visible_at = '-infinity', claimed_by = NULL, \
                       redelivery_count = d.redelivery_count + 1 \
                   FROM cfg WHERE d.sub_id = $1 AND d.seq = ANY($2) AND d.claimed_by = $3 \
                   AND d.seq BETWEEN (SELECT min(x) FROM unnest($2::int8[]) x) \
                   AND (SELECT max(x) FROM unnest($2::int8[]) x) \
                   RETURNING 1 \
                 ) \
                 SELECT pg_notify($5, '') FROM (SELECT count(*) AS n FROM r) AS x WHERE x.n > 0"
            ),
            // $1 sub_id, $2 token, $3 seqs handed to the application, $4 channel
            release: format!(
                "WITH r AS ( \
                   UPDATE {s}.deliveries d SET visible_at = '-infinity', claimed_by = NULL, \
                       redelivery_count = d.redelivery_count + (d.seq = ANY($3))::int \
                   WHERE d.sub_id = $1 AND d.claimed_by = $2 \
                   RETURNING 1 \
                 ) \
                 SELECT pg_notify($4, '') FROM (SELECT count(*) AS n FROM r) AS x WHERE x.n > 0"
            ),
            // $1 sub_id
            unsubscribe: format!(
                "WITH d AS (DELETE FROM {s}.deliveries WHERE sub_id = $1) \
                 DELETE FROM {s}.subscriptions WHERE id = $1"
            ),
            // $1 topic name: the topic's row, messages, subscriptions and their deliveries
            delete_topic: format!(
                "WITH t AS (DELETE FROM {s}.topics WHERE name = $1 RETURNING id), \
                 sub AS (DELETE FROM {s}.subscriptions WHERE topic_id IN (SELECT id FROM t) \
                   RETURNING id), \
                 d AS (DELETE FROM {s}.deliveries WHERE sub_id IN (SELECT id FROM sub)), \
                 m AS (DELETE FROM {s}.messages WHERE topic_id IN (SELECT id FROM t)) \
                 SELECT count(*) FROM t"
            ),
            // $1 retention ms
            cleanup_consumed: format!(
                "DELETE FROM {s}.messages m WHERE m.seq IN ( \
                   SELECT seq FROM {s}.messages \
                   WHERE created_at < now() - $1 * interval '1 millisecond' \
                   ORDER BY seq LIMIT 10000) \
                 AND NOT EXISTS (SELECT 1 FROM {s}.deliveries d WHERE d.seq = m.seq)"
            ),
            // $1 unconsumed retention ms
            cleanup_unconsumed: format!(
                "WITH old AS ( \
                   SELECT seq FROM {s}.messages \
                   WHERE created_at < now() - $1 * interval '1 millisecond' \
                   ORDER BY seq LIMIT 10000 \
                 ), dd AS (DELETE FROM {s}.deliveries d USING old WHERE d.seq = old.seq) \
                 DELETE FROM {s}.messages m USING old WHERE m.seq = old.seq"
            ),
        }
    }
}
