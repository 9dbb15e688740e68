//! The Lua scripts that make multi-step operations atomic on the server.

use std::sync::LazyLock;

use redis::Script;

/// Moves one pending entry of `src` (the topic stream or the retry stream) into the retry
/// stream with its redelivery count raised, and acknowledges the original. Shared by the scripts
/// below. Entries already acknowledged (XACK returns 0) are left alone, so nacking twice or after
/// an ack does nothing; entries trimmed from the stream are acknowledged and dropped.
///
/// `r` and `o` are read as the consumer reads them (`entry.rs`): an `r` that is not a count
/// (digits, at most 20, up to 4294967295) counts as 0 and an `o` that is not a stream id
/// (`<u64>-<u64>`) as absent, so the copy carries the entry's own id — the id the consumer
/// delivered it under; of a repeated `r` or `o` the last counts. Such a field is reported in the
/// server's log (a consumer reports it when it delivers the entry; nobody else sees it when a
/// crashed member's entry is reclaimed). Other fields are copied as they are.
const REQUEUE_FN: &str = r#"
local function u64(s)
  return #s < 20 or (#s == 20 and s <= '18446744073709551615')
end
local function requeue(src, retry, group, maxlen, id)
  local e = redis.call('XRANGE', src, id, id)
  if redis.call('XACK', src, group, id) == 0 then return 0 end
  local moved = 0
  if e[1] and e[1][2] then
    local f = e[1][2]
    local out = {}
    local r, o = 0, nil
    for j = 1, #f, 2 do
      local k, v = f[j], f[j + 1]
      if k == 'r' then
        r = 0
        if #v <= 20 and string.match(v, '^%d+$') and tonumber(v) <= 4294967295 then
          r = tonumber(v)
        else
          redis.log(redis.LOG_WARNING, 'tg-pubsub: entry ' .. id .. ' of ' .. src ..
            ': field r is not a delivery count; redelivered as delivered 0 times before')
        end
      elseif k == 'o' then
        local ms, seq = string.match(v, '^(%d+)%-(%d+)$')
        if ms and u64(ms) and u64(seq) then
          o = v
        else
          o = nil
          redis.log(redis.LOG_WARNING, 'tg-pubsub: entry ' .. id .. ' of ' .. src ..
            ': field o is not a stream entry id; redelivered under the entry id')
        end
      else out[#out + 1] = k; out[#out + 1] = v end
    end
    if r < 4294967295 then r = r + 1 end
    out[#out + 1] = 'r'; out[#out + 1] = string.format('%d', r)
    out[#out + 1] = 'o'; out[#out + 1] = o or id
    redis.call('XADD', retry, 'MAXLEN', '~', maxlen, '*', unpack(out))
    moved = 1
  end
  if src == retry then redis.call('XDEL', src, id) end
  return moved
end
"#;

/// Negative acknowledgement. KEYS: src, retry. ARGV: group, maxlen, ids…
pub(crate) static NACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{REQUEUE_FN}
local n = 0
for i = 3, #ARGV do n = n + requeue(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[i]) end
return n"
    ))
});

/// Hands back everything one consumer holds (close). KEYS: stream, retry. ARGV: group, maxlen,
/// consumer. Deletes the consumer from the group afterwards.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{REQUEUE_FN}
local n = 0
for _, src in ipairs({{KEYS[1], KEYS[2]}}) do
  for _ = 1, 1000 do
    local ok, p = pcall(redis.call, 'XPENDING', src, ARGV[1], '-', '+', 100, ARGV[3])
    if not ok or #p == 0 then break end
    for _, e in ipairs(p) do n = n + requeue(src, KEYS[2], ARGV[1], ARGV[2], e[1]) end
  end
  redis.pcall('XGROUP', 'DELCONSUMER', src, ARGV[1], ARGV[3])
end
return n"
    ))
});

/// Reclaims entries that stayed unacknowledged longer than the visibility timeout with any
/// consumer (one that crashed), moving them to the retry stream, and deletes consumers that hold
/// nothing and were idle that long. KEYS: stream, retry. ARGV: group, maxlen, min-idle ms,
/// sentinel consumer name, count.
pub(crate) static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{REQUEUE_FN}
local n = 0
local idle = tonumber(ARGV[3])
for _, src in ipairs({{KEYS[1], KEYS[2]}}) do
  local cursor = '0-0'
  for _ = 1, 100 do
    local ok, res = pcall(redis.call, 'XAUTOCLAIM', src, ARGV[1], ARGV[4], ARGV[3], cursor, 'COUNT', ARGV[5])
    if not ok then break end
    for _, e in ipairs(res[2]) do
      if e and e[1] then n = n + requeue(src, KEYS[2], ARGV[1], ARGV[2], e[1]) end
    end
    cursor = res[1]
    if cursor == '0-0' then break end
  end
  redis.pcall('XGROUP', 'DELCONSUMER', src, ARGV[1], ARGV[4])
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', src, ARGV[1])
  if ok then
    for _, c in ipairs(consumers) do
      local info = {{}}
      for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
      if info['pending'] == 0 and tonumber(info['idle']) > idle then
        redis.pcall('XGROUP', 'DELCONSUMER', src, ARGV[1], info['name'])
      end
    end
  end
end
return n"
    ))
});

/// q2 send: XADD unless the de-duplication id was seen within the window; returns the id of the
/// entry (the first copy's for a duplicate). KEYS: stream, dedup key. ARGV: maxlen, window
/// seconds, fields…
pub(crate) static DEDUP_XADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local prev = redis.call('GET', KEYS[2])
if prev then return prev end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
return id"#,
    )
});

/// Renews a lease if we still hold it. KEYS: lease. ARGV: token, ms. Returns 1 or 0.
pub(crate) static LEASE_RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0"#,
    )
});

/// Deletes a lease if we hold it. KEYS: lease. ARGV: token.
pub(crate) static LEASE_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"#,
    )
});
