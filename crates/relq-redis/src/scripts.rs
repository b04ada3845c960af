//! The Lua scripts. Each runs atomically on the server; together they are every state change the
//! backend makes, so a client crash between two calls never leaves a half-applied operation.
//!
//! Conventions: `KEYS[1]` is the topic's stream (so Redis Cluster routes the call to the topic's
//! slot), `ARGV[1]` the topic's key prefix `relq:{<topic>}:`; every other key a script touches
//! starts with that prefix, so all of them hash to the same slot. Message ids are compared as
//! decimal strings (`idcmp`), never as Lua numbers, which lose precision above 2^53.

/// Shared helpers, prepended to every script.
const PRELUDE: &str = r#"
local S = KEYS[1]
local P = ARGV[1]
local function numcmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function idcmp(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  local c = numcmp(am, bm)
  if c ~= 0 then return c end
  return numcmp(as, bs)
end
local function idms(id) return tonumber(string.match(id, '^(%d+)-')) end
-- A decimal string plus one, exact at any length (Lua numbers lose precision above 2^53).
local function inc(s)
  local i = #s
  while i > 0 and string.sub(s, i, i) == '9' do i = i - 1 end
  if i == 0 then return '1' .. string.rep('0', #s) end
  return string.sub(s, 1, i - 1) .. (tonumber(string.sub(s, i, i)) + 1) .. string.rep('0', #s - i)
end
-- The smallest id after `id`.
local function next_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if seq == '18446744073709551615' then return inc(ms) .. '-0' end
  return ms .. '-' .. inc(seq)
end
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
local function ended(epoch)
  local e = redis.call('GET', P .. 'ended')
  return e and numcmp(e, epoch) >= 0
end
local function gk(g) return P .. 'g:' .. g .. ':' end
-- A topic exists once published to (the stream) or joined (the metadata).
local function topic_exists() return redis.call('EXISTS', P .. 'meta', S) > 0 end
-- meta value: "<deliveries> <failures json array>"
local function meta(gkey, id)
  local m = redis.call('HGET', gkey .. 'm', id)
  if not m then return 0, '[]' end
  local n, f = string.match(m, '^(%d+) (.*)$')
  return tonumber(n), f
end
-- Takes `id` out of the group's pending list into the scheduled set (due >= 0) or the parked
-- set (due < 0), keeping `n` deliveries and its failure history. Does nothing (returns false)
-- if the entry is not pending, so a replayed call cannot resurrect a settled entry.
local function hold(g, id, due, n)
  local gkey = gk(g)
  local _, f = meta(gkey, id)
  if redis.call('XACK', S, g, id) == 0 then return false end
  redis.call('HSET', gkey .. 'm', id, n .. ' ' .. f)
  redis.call('ZADD', gkey .. 'held', idms(id), id)
  if due < 0 then
    redis.call('SADD', gkey .. 'park', id)
  else
    redis.call('ZADD', gkey .. 'sched', due, id)
  end
  return true
end
-- The deliver_at field as a number, or nil if absent or not a number (then the entry is due:
-- the client reports such an entry as malformed).
local function due_at(fields)
  local at = field(fields, 'deliver_at')
  return at and tonumber(at)
end
local function stopped_set()
  local set = {}
  for _, id in ipairs(redis.call('SMEMBERS', P .. 'stop')) do set[id] = true end
  return set
end
-- Recreates the topic's metadata after Redis lost it (restart without persistence, eviction,
-- FLUSHALL); returns 1 if it had to.
local function ensure_meta(epoch)
  if redis.call('EXISTS', P .. 'meta') == 1 then return 0 end
  redis.call('HSET', P .. 'meta', 'epoch', epoch)
  return 1
end
-- A group deleted by an operator: its running consumers must stop, not create it again.
local function deleted(g)
  return redis.call('SISMEMBER', P .. 'deleted', g) == 1
end
local GROUP_DELETED = 'RELQ_GROUP_DELETED the group was deleted'
local function new_epoch()
  local t = redis.call('TIME')
  local e = t[1] .. string.format('%06d', tonumber(t[2]))
  local last = redis.call('GET', P .. 'ended')
  if last and numcmp(last, e) >= 0 then e = inc(last) end
  return e
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Ordering keys (docs/design.md, "Per-key ordering"). Per group: `kq`, a sorted set (score 0)
-- of every keyed entry read and not settled, as key NUL padded-id, so a key's entries sort in
-- id order; `ki`, id -> key; `kw`, the entries waiting for their key (also in `held`); `kc`,
-- the last id whose key was checked. Keys hold no control characters.
local function pad(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
end
local function strip(d)
  local s = string.gsub(d, '^0+', '')
  if s == '' then return '0' end
  return s
end
local function key_first(gkey, k)
  return redis.call('ZRANGEBYLEX', gkey .. 'kq', '[' .. k .. '\0', '(' .. k .. '\1', 'LIMIT', 0, 1)[1]
end
-- Ends `id`'s place under its key. If it held the key, the key's next entry (waiting) becomes
-- due now, or at its delivery time if later. Returns 1 if an entry became due, else 0.
local function release_key(g, id)
  local gkey = gk(g)
  local k = redis.call('HGET', gkey .. 'ki', id)
  if not k then return 0 end
  redis.call('HDEL', gkey .. 'ki', id)
  redis.call('ZREM', gkey .. 'kq', k .. '\0' .. pad(id))
  if redis.call('ZREM', gkey .. 'kw', id) == 1 then return 0 end
  while true do
    local m = key_first(gkey, k)
    if not m then return 0 end
    local ms, seq = string.match(string.sub(m, #k + 2), '^(%d+)-(%d+)$')
    local nid = strip(ms) .. '-' .. strip(seq)
    if redis.call('ZREM', gkey .. 'kw', nid) == 0 then return 0 end
    local e = redis.call('XRANGE', S, nid, nid)[1]
    if e then
      local due = now_ms()
      local at = due_at(e[2])
      if at and at > due then due = at end
      redis.call('ZADD', gkey .. 'sched', due, nid)
      return 1
    end
    -- Trimmed by a max-length policy while it waited: the key passes on.
    redis.call('HDEL', gkey .. 'ki', nid)
    redis.call('ZREM', gkey .. 'kq', m)
    redis.call('ZREM', gkey .. 'held', nid)
    redis.call('HDEL', gkey .. 'm', nid)
  end
end
-- Enters entry `id` of key `k`, delivered and unchecked, under its key: it holds the key if
-- no entry of the key is unsettled; else it waits (it leaves the pending list for `kw`). Only
-- an entry pending in the group is entered (one settled or set aside without a check is not
-- in flight, and must not hold or wait for a key).
local function key_enter(g, id, k)
  local gkey = gk(g)
  if redis.call('HEXISTS', gkey .. 'ki', id) == 1 then return end
  local p = redis.call('XPENDING', S, g, id, id, 1)
  if not p[1] then return end
  local first = key_first(gkey, k)
  redis.call('ZADD', gkey .. 'kq', 0, k .. '\0' .. pad(id))
  redis.call('HSET', gkey .. 'ki', id, k)
  if first then
    redis.call('XACK', S, g, id)
    redis.call('ZADD', gkey .. 'held', idms(id), id)
    redis.call('ZADD', gkey .. 'kw', idms(id), id)
  end
end
-- The group's last-delivered id.
local function last_delivered(g)
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', S)) do
    local name, last
    for j = 1, #info, 2 do
      if info[j] == 'name' then name = info[j + 1] end
      if info[j] == 'last-delivered-id' then last = info[j + 1] end
    end
    if name == g then return last end
  end
  return nil
end
-- Checks the keys of the entries the group read after `kc` up to `upto`, in id order (see
-- `key_enter`). Each entry is checked once, whoever read it, so keys pass in id order however
-- reads interleave. Never past the group's last-delivered id (after a move back, entries above
-- it are read again first). Returns the new `kc`.
local function keys_catch_up(g, upto, kc)
  local gkey = gk(g)
  local last = last_delivered(g)
  if not last then return kc end
  if idcmp(upto, last) > 0 then upto = last end
  if kc and idcmp(upto, kc) <= 0 then return kc end
  -- A group without `kc` (created by a build without ordering keys) starts at `upto`.
  local from = kc and ('(' .. kc) or upto
  while true do
    local page = redis.call('XRANGE', S, from, upto, 'COUNT', 500)
    for _, e in ipairs(page) do
      local k = field(e[2], 'key')
      if k then key_enter(g, e[1], k) end
    end
    if #page < 500 then break end
    from = '(' .. page[#page][1]
  end
  redis.call('SET', gkey .. 'kc', upto)
  return upto
end
-- Marks the topic as carrying ordering keys (reads check keys from then on); the first time,
-- every group's checks start at its cursor (nothing before was keyed).
local function mark_keyed()
  if redis.call('SET', P .. 'keyed', '1', 'NX') then
    if redis.call('EXISTS', S) == 1 then
      for _, info in ipairs(redis.call('XINFO', 'GROUPS', S)) do
        local name, last
        for j = 1, #info, 2 do
          if info[j] == 'name' then name = info[j + 1] end
          if info[j] == 'last-delivered-id' then last = info[j + 1] end
        end
        redis.call('SET', gk(name) .. 'kc', last, 'NX')
      end
    end
  end
end
-- Starts a new (or recreated) group's key checks at its cursor `at` (an id, '$' or '0').
local function keys_start(g, at)
  local gkey = gk(g)
  -- Waiting entries of a group lost and created again leave `held` with it.
  for _, id in ipairs(redis.call('ZRANGE', gkey .. 'kw', 0, -1)) do
    redis.call('ZREM', gkey .. 'held', id)
    redis.call('HDEL', gkey .. 'm', id)
  end
  redis.call('DEL', gkey .. 'kq', gkey .. 'ki', gkey .. 'kw')
  if at == '$' then
    at = '0-0'
    local st = redis.pcall('XINFO', 'STREAM', S)
    if type(st) == 'table' and not st.err then
      for j = 1, #st, 2 do
        if st[j] == 'last-generated-id' then at = st[j + 1] end
      end
    end
  elseif at == '0' then
    at = '0-0'
  end
  redis.call('SET', gkey .. 'kc', at)
end
local GROUP_KEYS = {'sched', 'park', 'm', 'held', 'skip', 'p', 'pa', 'rl', 'kq', 'ki', 'kw', 'kc'}
local function del_group_keys(g)
  local gkey = gk(g)
  for _, k in ipairs(GROUP_KEYS) do redis.call('DEL', gkey .. k) end
end
"#;

/// A retried publish (the first attempt, a plain MULTI/EXEC of XADDs, may have been applied
/// before its reply was lost). ARGV: prefix, window_ms, nonce, count, then per message: type,
/// data, headers (JSON or ""), deliver_at (ms or ""), ordering key (or ""). Looks for the batch carrying `nonce` among
/// the entries of the last window_ms and returns its ids; appends the batch if it is not there.
pub(super) const PUBLISH: &str = r#"
local window, nonce, count = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if window > 0 then
  local t = redis.call('TIME')
  local floor = (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) - window
  local hi = '+'
  -- Bounded: at most 100,000 entries are looked at (a long outage under a high publish rate);
  -- past that the batch is appended again, as a duplicate at worst, never lost.
  for _ = 1, 200 do
    local page = redis.call('XREVRANGE', S, hi, string.format('%d', floor), 'COUNT', 500)
    for _, e in ipairs(page) do
      if field(e[2], 'nonce') == nonce then
        local ids = {}
        for _, f in ipairs(redis.call('XRANGE', S, e[1], '+', 'COUNT', count)) do ids[#ids + 1] = f[1] end
        return ids
      end
    end
    if #page < 500 then break end
    hi = '(' .. page[#page][1]
  end
end
local ids = {}
local i = 5
for n = 1, count do
  local fields = {'type', ARGV[i], 'data', ARGV[i + 1]}
  if ARGV[i + 2] ~= '' then fields[#fields + 1] = 'headers'; fields[#fields + 1] = ARGV[i + 2] end
  if ARGV[i + 3] ~= '' then fields[#fields + 1] = 'deliver_at'; fields[#fields + 1] = ARGV[i + 3] end
  if ARGV[i + 4] ~= '' then
    fields[#fields + 1] = 'key'; fields[#fields + 1] = ARGV[i + 4]
    mark_keyed()
  end
  if n == 1 then fields[#fields + 1] = 'nonce'; fields[#fields + 1] = nonce end
  ids[n] = redis.call('XADD', S, '*', unpack(fields))
  i = i + 5
end
return ids
"#;

/// A publish with idempotency keys: each keyed message whose key the topic stored within its
/// window answers with that message's id and is not appended; the others are appended and their
/// keys recorded (`dedup`: key -> "<id> <end of window ms>", `dedup_at`: key by the end of its
/// window, for pruning). ARGV: prefix, nonce, nonce_ttl_ms (0: the batch has no unkeyed
/// message, whose keys alone make a retry safe), count, then per message: type, data, headers
/// (JSON or ""), deliver_at (ms or ""), ordering key (or ""), idempotency key ("" for none),
/// window_ms. Returns the ids. With a
/// nonce TTL the ids are also kept under the nonce, so a retry of a batch whose reply was lost
/// answers the same ids.
pub(super) const PUBLISH_KEYED: &str = r#"
local nonce, nonce_ttl, count = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local NK = P .. 'n:' .. nonce
if nonce_ttl > 0 then
  local done = redis.call('GET', NK)
  if done then return cjson.decode(done) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local D, DA = P .. 'dedup', P .. 'dedup_at'
local gone = redis.call('ZRANGEBYSCORE', DA, '-inf', now, 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('HDEL', D, unpack(gone))
  redis.call('ZREM', DA, unpack(gone))
end
local ids = {}
local i = 5
for n = 1, count do
  local key = ARGV[i + 5]
  local id = nil
  if key ~= '' then
    local v = redis.call('HGET', D, key)
    if v then
      local known, untl = string.match(v, '^(%S+) (%d+)$')
      if known and tonumber(untl) > now then id = known end
    end
  end
  if not id then
    local fields = {'type', ARGV[i], 'data', ARGV[i + 1]}
    if ARGV[i + 2] ~= '' then fields[#fields + 1] = 'headers'; fields[#fields + 1] = ARGV[i + 2] end
    if ARGV[i + 3] ~= '' then fields[#fields + 1] = 'deliver_at'; fields[#fields + 1] = ARGV[i + 3] end
    if ARGV[i + 4] ~= '' then
      fields[#fields + 1] = 'key'; fields[#fields + 1] = ARGV[i + 4]
      mark_keyed()
    end
    id = redis.call('XADD', S, '*', unpack(fields))
    if key ~= '' then
      local untl = now + tonumber(ARGV[i + 6])
      redis.call('HSET', D, key, id .. ' ' .. string.format('%d', untl))
      redis.call('ZADD', DA, untl, key)
    end
  end
  ids[n] = id
  i = i + 7
end
if nonce_ttl > 0 then redis.call('SET', NK, cjson.encode(ids), 'PX', nonce_ttl) end
return ids
"#;

/// Whether a key is recorded as processed for a group, its record not expired. ARGV: prefix,
/// group, key. Returns 1 or 0.
pub(super) const PROCESSED: &str = r#"
local v = redis.call('HGET', gk(ARGV[2]) .. 'p', ARGV[3])
if not v then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(v) > now then return 1 end
return 0
"#;

/// Records a key as processed for a group (`p`: key -> end of the record in ms; `pa`: keys by
/// end, for pruning), unless the subscription's generation ended or the group does not exist.
/// ARGV: prefix, group, key, ttl_ms, epoch. Returns 1 when recorded.
pub(super) const RECORD_PROCESSED: &str = r#"
local g = ARGV[2]
if ended(ARGV[5]) or deleted(g) then return 0 end
local r = redis.pcall('XINFO', 'CONSUMERS', S, g)
if type(r) == 'table' and r.err then return 0 end
local gkey = gk(g)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', gkey .. 'pa', '-inf', now, 'LIMIT', 0, 100)
if #gone > 0 then
  redis.call('HDEL', gkey .. 'p', unpack(gone))
  redis.call('ZREM', gkey .. 'pa', unpack(gone))
end
local untl = now + tonumber(ARGV[4])
redis.call('HSET', gkey .. 'p', ARGV[3], string.format('%d', untl))
redis.call('ZADD', gkey .. 'pa', untl, ARGV[3])
return 1
"#;

/// Takes up to `want` tokens from a group's rate limit bucket (`g:{G}:rl`: tokens and the
/// time of the last take, by the server's clock in ms), created full, after putting back unused
/// tokens. ARGV: prefix, group, want, capacity (n), period in ms, tokens to put back. Returns
/// {granted, ms until a token is there (0 when some were granted)}. The bucket expires once it
/// would be full again.
pub(super) const TAKE_TOKENS: &str = r#"
local key = gk(ARGV[2]) .. 'rl'
local want, cap, per = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rate = cap / per
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local st = redis.call('HMGET', key, 'tokens', 'at')
local tokens, at = tonumber(st[1]), tonumber(st[2])
if not tokens or not at then tokens, at = cap, now end
tokens = math.min(cap, tokens + tonumber(ARGV[6]))
if now > at then tokens = math.min(cap, tokens + (now - at) * rate) else now = at end
local granted = math.max(0, math.min(want, math.floor(tokens)))
tokens = tokens - granted
redis.call('HSET', key, 'tokens', string.format('%.6f', tokens), 'at', string.format('%.3f', now))
redis.call('PEXPIRE', key, per + 1000)
local wait = 0
if granted == 0 then wait = math.max(1, math.ceil((1 - tokens) / rate)) end
return {granted, wait}
"#;

/// Creates the topic and the group if needed. ARGV: prefix, group, consumer, start id ('$', '0'
/// or an id). Returns the topic's epoch.
pub(super) const JOIN: &str = r#"
local g, c, start = ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', P .. 'meta') == 0 then
  redis.call('HSET', P .. 'meta', 'epoch', new_epoch())
end
redis.call('SREM', P .. 'deleted', g)
local r = redis.pcall('XGROUP', 'CREATE', S, g, start, 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP') then return r end
if not (type(r) == 'table' and r.err) then keys_start(g, start) end
redis.call('XGROUP', 'CREATECONSUMER', S, g, c)
return redis.call('HGET', P .. 'meta', 'epoch')
"#;

/// Delivers due scheduled entries (retries, delayed messages, resumed ones) by putting them back
/// into the group's pending list under this consumer, then fills the rest of `max` with new
/// entries by a non-blocking `XREADGROUP` in the same call, so a busy consumer's read is one
/// round trip. ARGV: prefix, group, consumer, epoch, now_ms, max. Returns {lost,
/// deliveries, next_due_ms|false, stopped ids, XREADGROUP reply|false, size of the skip set}
/// where a delivery is {id, deliveries, fields, failures_json}. Only a consumer that finds
/// nothing then waits in a blocking `XREADGROUP` of its own (scripts cannot block).
pub(super) const PROMOTE: &str = r#"
local g, c, epoch, now, max = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
if ended(epoch) then return redis.error_reply('RELQ_TERMINATED the topic was terminated') end
if deleted(g) then return redis.error_reply(GROUP_DELETED) end
local lost = ensure_meta(epoch)
local gkey = gk(g)
local stopped = redis.call('SMEMBERS', P .. 'stop')
local out = {}
local due = redis.call('ZRANGEBYSCORE', gkey .. 'sched', '-inf', now, 'LIMIT', 0, max)
if #due > 0 then
  local stop = {}
  for _, id in ipairs(stopped) do stop[id] = true end
  for _, id in ipairs(due) do
    redis.call('ZREM', gkey .. 'sched', id)
    if stop[id] then
      redis.call('SADD', gkey .. 'park', id)
    else
      redis.call('ZREM', gkey .. 'held', id)
      local n, f = meta(gkey, id)
      local r = redis.pcall('XCLAIM', S, g, c, 0, id, 'FORCE', 'RETRYCOUNT', n + 1)
      if type(r) == 'table' and r.err then
        redis.call('XGROUP', 'CREATE', S, g, '0', 'MKSTREAM')
        keys_start(g, '0')
        lost = 1
        r = redis.call('XCLAIM', S, g, c, 0, id, 'FORCE', 'RETRYCOUNT', n + 1)
      end
      if r[1] and r[1][2] then
        out[#out + 1] = {id, n + 1, r[1][2], f}
      else
        -- Trimmed by a max-length policy: its key passes on.
        redis.call('HDEL', gkey .. 'm', id)
        release_key(g, id)
      end
    end
  end
end
local nd = redis.call('ZRANGE', gkey .. 'sched', 0, 0, 'WITHSCORES')
local fresh, skip = false, 0
if #out < max then
  local r = redis.pcall('XREADGROUP', 'GROUP', g, c, 'COUNT', max - #out, 'STREAMS', S, '>')
  if type(r) == 'table' and r.err and string.find(r.err, 'NOGROUP') then
    redis.call('XGROUP', 'CREATE', S, g, '0', 'MKSTREAM')
    keys_start(g, '0')
    lost = 1
    r = redis.pcall('XREADGROUP', 'GROUP', g, c, 'COUNT', max - #out, 'STREAMS', S, '>')
  end
  -- Another failure leaves the new entries to the client's own read: what was promoted above
  -- is handed over, not lost behind an error.
  if not (type(r) == 'table' and r.err) then
    fresh = r
    skip = redis.call('ZCARD', gkey .. 'skip')
  end
end
return {lost, out, nd[2] or false, stopped, fresh, skip}
"#;

/// Recreates a group a read found missing (Redis lost it), unless the topic was terminated.
/// ARGV: prefix, group, epoch. Returns 1.
pub(super) const RECREATE: &str = r#"
local g, epoch = ARGV[2], ARGV[3]
if ended(epoch) then return redis.error_reply('RELQ_TERMINATED the topic was terminated') end
if deleted(g) then return redis.error_reply(GROUP_DELETED) end
ensure_meta(epoch)
local r = redis.pcall('XGROUP', 'CREATE', S, g, '0', 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP') then return r end
if not (type(r) == 'table' and r.err) then keys_start(g, '0') end
return 1
"#;

/// Hands back entries a read of a terminated generation took from the topic's next generation
/// (its group joined again by another consumer): each still pending for this consumer is
/// scheduled for delivery now (a delayed one when due), keeping its delivery count, as if it had
/// not been read. ARGV:
/// prefix, group, consumer, now_ms, then ids. Returns 1.
pub(super) const GIVE_BACK: &str = r#"
local g, c, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
for i = 5, #ARGV do
  local id = ARGV[i]
  local p = redis.pcall('XPENDING', S, g, id, id, 1, c)
  if type(p) == 'table' and not p.err and p[1] then
    -- A delayed message keeps its due time.
    local e = redis.call('XRANGE', S, id, id)[1]
    local at = e and due_at(e[2])
    if not at or at < now then at = now end
    hold(g, id, at, tonumber(p[1][4]) - 1)
  end
end
return 1
"#;

/// Moves entries a read delivered that must not run yet (stopped, or delayed and not due).
/// ARGV: prefix, group, epoch, now_ms, then pairs of id, due_ms (-1 = park: stopped). Returns
/// the ids to deliver after all: stopped ones whose stop marker was removed since the client
/// looked, that are due and still pending for this read.
pub(super) const HOLD: &str = r#"
local g, now = ARGV[2], tonumber(ARGV[4])
if ended(ARGV[3]) then return redis.error_reply('RELQ_TERMINATED the topic was terminated') end
local release = {}
for i = 5, #ARGV, 2 do
  local id, due = ARGV[i], tonumber(ARGV[i + 1])
  if due < 0 and redis.call('SISMEMBER', P .. 'stop', id) == 0 then
    local e = redis.call('XRANGE', S, id, id)[1]
    local at = e and due_at(e[2])
    if at and at > now then
      hold(g, id, at, 0)
    elseif redis.call('XPENDING', S, g, id, id, 1)[1] then
      release[#release + 1] = id
    end
  else
    hold(g, id, due, 0)
  end
end
return release
"#;

/// Delivers pending entries again, counting the delivery. ARGV: prefix, group, consumer, epoch,
/// now_ms, max, mode, arg, consumer_expiry_ms. mode 'recover': this consumer's entries after id `arg`; mode 'claim':
/// any consumer's entries idle for at least `arg` ms. Returns {lost, deliveries} like READ.
pub(super) const REDELIVER: &str = r#"
local g, c, epoch, now, max, mode, arg = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
if ended(epoch) then return redis.error_reply('RELQ_TERMINATED the topic was terminated') end
if deleted(g) then return redis.error_reply(GROUP_DELETED) end
local lost = ensure_meta(epoch)
local gkey = gk(g)
local pend
if mode == 'recover' then
  pend = redis.pcall('XPENDING', S, g, '(' .. arg, '+', max, c)
else
  pend = redis.pcall('XPENDING', S, g, 'IDLE', arg, '-', '+', max)
end
if type(pend) == 'table' and pend.err then
  if not string.find(pend.err, 'NOGROUP') then return pend end
  redis.call('XGROUP', 'CREATE', S, g, '0', 'MKSTREAM')
  keys_start(g, '0')
  return {1, {}}
end
local stop = stopped_set()
-- An entry read but not yet key-checked (its reader died before the check) is checked before
-- it is delivered again.
local keyed = redis.call('EXISTS', P .. 'keyed') == 1
local kc = keyed and redis.call('GET', gkey .. 'kc')
local out = {}
local min_idle = 0
if mode ~= 'recover' then min_idle = arg end
-- Entries set aside (stopped, not yet due) do not count: page on until max deliveries or the
-- end of the pending list, so an empty reply means there is nothing left.
local pages = 0
local asked = max
while true do
  pages = pages + 1
  local last = nil
  for _, p in ipairs(pend) do
    local id, count = p[1], p[4]
    last = id
    if keyed and (not kc or idcmp(id, kc) > 0) then kc = keys_catch_up(g, id, kc) end
    local r = redis.call('XCLAIM', S, g, c, min_idle, id, 'RETRYCOUNT', count + 1)
    if r[1] and r[1][2] and keyed then
      -- Keyed and still unchecked (behind `kc` after a forward move): checked now.
      local k = field(r[1][2], 'key')
      if k then
        key_enter(g, id, k)
        if redis.call('ZSCORE', gkey .. 'kw', id) then r = {} end
      end
    end
    if r[1] and r[1][2] then
      local fields = r[1][2]
      local at = due_at(fields)
      if stop[id] then
        hold(g, id, -1, count)
      elseif at and at > now then
        hold(g, id, at, count - 1)
      else
        local _, f = meta(gkey, id)
        out[#out + 1] = {id, count + 1, fields, f}
      end
    elseif r[1] == nil and #r == 0 then
      -- claimed by someone else meanwhile, or deleted from the stream
      if redis.call('XRANGE', S, id, id)[1] == nil then
        redis.call('XACK', S, g, id)
        redis.call('HDEL', gkey .. 'm', id)
        release_key(g, id)
      end
    end
  end
  if #out >= max or #pend < asked or last == nil or pages >= 100 then break end
  local want = max - #out
  asked = want
  if mode == 'recover' then
    pend = redis.call('XPENDING', S, g, '(' .. last, '+', want, c)
  else
    pend = redis.call('XPENDING', S, g, 'IDLE', arg, '(' .. last, '+', want)
  end
end
if mode ~= 'recover' then
  -- Housekeeping while claiming: consumers that hold nothing and were not seen for ARGV[9] ms
  -- are removed from the group (a live one is added back by its next read), so restarts under new
  -- names do not pile up consumers.
  for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', S, g)) do
    local name, pending, idle
    for j = 1, #info, 2 do
      if info[j] == 'name' then name = info[j + 1] end
      if info[j] == 'pending' then pending = info[j + 1] end
      if info[j] == 'idle' then idle = info[j + 1] end
    end
    if name ~= c and pending == 0 and idle and idle > tonumber(ARGV[9]) then
      redis.call('XGROUP', 'DELCONSUMER', S, g, name)
    end
  end
end
return {lost, out}
"#;

/// The SETTLE script's entry opcodes (its `op == 'a'` / `'r'` / `'d'`).
pub(super) const SETTLE_ACK: &[u8] = b"a";
pub(super) const SETTLE_RETRY: &[u8] = b"r";
pub(super) const SETTLE_DEAD_LETTER: &[u8] = b"d";

/// Settles a batch. ARGV: prefix, group, epoch, settling consumer, then entries: 'a', id | 'r', id, due_ms,
/// failure_json, attempt, release key ('1' or '0') | 'd', id, dead_letter_json, payload,
/// attempts. Returns how many entries became due because a settled entry let their ordering key
/// pass to them. Entries no longer
/// pending are ignored, and so is a retry or dead letter for a delivery that was superseded: the
/// entry's count moved on and another consumer holds it (claimed from the settling one).
pub(super) const SETTLE: &str = r#"
local g, c = ARGV[2], ARGV[4]
if ended(ARGV[3]) then return redis.error_reply('RELQ_TERMINATED the topic was terminated') end
if deleted(g) then return redis.error_reply(GROUP_DELETED) end
local gkey = gk(g)
local has_meta = redis.call('EXISTS', gkey .. 'm') == 1
-- Entries whose key passed to their next entry (which became due).
local woke = 0
-- A retry or dead letter settles the delivery it names: it applies if the entry is pending with
-- that delivery count, or still held by the settling consumer (which may have recovered it
-- meanwhile, raising the count). Claimed by another consumer since: stale, ignored.
local function current(p, attempt)
  return p[1] and (tostring(p[1][4]) == attempt or p[1][2] == c)
end
local i = 5
while i <= #ARGV do
  local op, id = ARGV[i], ARGV[i + 1]
  if op == 'a' then
    -- The failure history goes only with the delivery it belongs to: an ack of an entry that
    -- is no longer pending (claimed and retried by another consumer) leaves it alone.
    if redis.pcall('XACK', S, g, id) == 1 then
      if has_meta then redis.call('HDEL', gkey .. 'm', id) end
      woke = woke + release_key(g, id)
    end
    i = i + 2
  elseif op == 'r' then
    local p = redis.pcall('XPENDING', S, g, id, id, 1)
    -- Only the delivery that failed: if the entry was claimed (or retried and promoted) since,
    -- its count moved on and this settlement is stale.
    if type(p) == 'table' and not p.err and current(p, ARGV[i + 4]) then
      local _, f = meta(gkey, id)
      if f == '[]' then f = '[' .. ARGV[i + 3] .. ']' else f = string.sub(f, 1, -2) .. ',' .. ARGV[i + 3] .. ']' end
      redis.call('XACK', S, g, id)
      redis.call('HSET', gkey .. 'm', id, p[1][4] .. ' ' .. f)
      redis.call('ZADD', gkey .. 'held', idms(id), id)
      redis.call('ZADD', gkey .. 'sched', ARGV[i + 2], id)
      has_meta = true
      if ARGV[i + 5] == '1' then woke = woke + release_key(g, id) end
    end
    i = i + 6
  else
    local p = redis.pcall('XPENDING', S, g, id, id, 1)
    if type(p) == 'table' and not p.err and current(p, ARGV[i + 4]) then
      redis.call('XACK', S, g, id)
      if has_meta then redis.call('HDEL', gkey .. 'm', id) end
      redis.call('XADD', P .. 'dl', '*', 'record', ARGV[i + 2], 'data', ARGV[i + 3])
      woke = woke + release_key(g, id)
    end
    i = i + 5
  end
end
return woke
"#;

/// Checks the ordering keys of entries a read delivered (see `keys_catch_up`). ARGV: prefix,
/// group, epoch, consumer, then pairs of id and key for the entries the read took that carry a
/// key, in id order. Returns those the reader must not run: waiting for their key, or no longer
/// pending for it (another check made one wait and its key passed to it since: it is delivered
/// from the schedule).
pub(super) const KEYCHECK: &str = r#"
local g, c = ARGV[2], ARGV[4]
if ended(ARGV[3]) then return redis.error_reply('RELQ_TERMINATED the topic was terminated') end
if deleted(g) then return redis.error_reply(GROUP_DELETED) end
local gkey = gk(g)
local kc = keys_catch_up(g, ARGV[#ARGV - 1], redis.call('GET', gkey .. 'kc'))
local out = {}
for i = 5, #ARGV, 2 do
  local id = ARGV[i]
  -- Behind `kc` unchecked (a forward move, or a group without `kc`): checked now.
  if redis.call('HEXISTS', gkey .. 'ki', id) == 0 then key_enter(g, id, ARGV[i + 1]) end
  local p = redis.call('XPENDING', S, g, id, id, 1)
  if redis.call('ZSCORE', gkey .. 'kw', id) or not p[1] or p[1][2] ~= c then out[#out + 1] = id end
end
return out
"#;

/// Marks a topic as carrying ordering keys (see `mark_keyed`), before a publish of keyed
/// messages that does not run a script. ARGV: prefix. Returns 1.
pub(super) const MARK_KEYED: &str = r#"
mark_keyed()
return 1
"#;

/// Stops a message for every group. ARGV: prefix, id. Returns 0 if the topic does not exist.
pub(super) const STOP: &str = r#"
local id = ARGV[2]
if not topic_exists() then return 0 end
redis.call('SADD', P .. 'stop', id)
for _, info in ipairs(redis.call('XINFO', 'GROUPS', S)) do
  local gkey = gk(info[2])
  if redis.call('ZREM', gkey .. 'sched', id) == 1 then redis.call('SADD', gkey .. 'park', id) end
end
return 1
"#;

/// Resumes a stopped message: parked entries become due now. ARGV: prefix, id, now_ms. Returns
/// {topic exists, was stopped}.
pub(super) const RESUME: &str = r#"
local id, now = ARGV[2], ARGV[3]
if not topic_exists() then return {0, 0} end
local was = redis.call('SREM', P .. 'stop', id)
for _, info in ipairs(redis.call('XINFO', 'GROUPS', S)) do
  local gkey = gk(info[2])
  if redis.call('SREM', gkey .. 'park', id) == 1 then redis.call('ZADD', gkey .. 'sched', now, id) end
end
return {1, was}
"#;

/// Removes every key of the topic and records its epoch as ended. ARGV: prefix. Returns whether
/// the topic existed.
pub(super) const TERMINATE: &str = r#"
local epoch = redis.call('HGET', P .. 'meta', 'epoch')
local existed = epoch and 1 or 0
if redis.call('EXISTS', S) == 1 then
  existed = 1
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', S)) do
    del_group_keys(info[2])
  end
end
redis.call('DEL', S, P .. 'meta', P .. 'stop', P .. 'dl', P .. 'deleted', P .. 'dedup', P .. 'dedup_at', P .. 'keyed')
if existed == 1 then
  if not epoch then epoch = new_epoch() end
  local last = redis.call('GET', P .. 'ended')
  if not last or numcmp(last, epoch) < 0 then redis.call('SET', P .. 'ended', epoch) end
end
return existed
"#;

/// The CLEANUP script's last argument: count only, change nothing.
pub(super) const CLEANUP_PREVIEW: &str = "1";
/// The CLEANUP script's last argument: remove.
pub(super) const CLEANUP_APPLY: &str = "0";

/// One bounded cleanup step. ARGV: prefix, cutoff_ms, batch, max_len (-1 = none), preview
/// ('1': change nothing, return {floor or false}: every entry below the floor is acknowledged by
/// every group). Returns {removed acknowledged, trimmed unacknowledged}.
pub(super) const CLEANUP: &str = r#"
local cutoff, batch, max_len = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', S) == 0 then
  if ARGV[5] == '1' then return {false} end
  return {0, 0}
end
local groups = redis.call('XINFO', 'GROUPS', S)
local floor = nil
local function lower(id) if floor == nil or idcmp(id, floor) < 0 then floor = id end end
for _, info in ipairs(groups) do
  local name, last
  for j = 1, #info, 2 do
    if info[j] == 'name' then name = info[j + 1] end
    if info[j] == 'last-delivered-id' then last = info[j + 1] end
  end
  lower(next_id(last))
  local pend = redis.call('XPENDING', S, name)
  if pend[1] > 0 then lower(pend[2]) end
  local held = redis.call('ZRANGE', gk(name) .. 'held', 0, 0, 'WITHSCORES')
  if held[1] then lower(held[2] .. '-0') end
end
if ARGV[5] == '1' then return {floor or false} end
local removed, trimmed = 0, 0
if floor then
  local page = redis.call('XRANGE', S, '-', '+', 'COUNT', batch)
  local boundary = nil
  for _, e in ipairs(page) do
    if idcmp(e[1], floor) >= 0 or idms(e[1]) > cutoff then boundary = e[1]; break end
    removed = removed + 1
  end
  if removed > 0 then
    if boundary == nil then boundary = next_id(page[#page][1]) end
    redis.call('XTRIM', S, 'MINID', boundary)
  end
end
if max_len >= 0 and removed == 0 then
  local excess = redis.call('XLEN', S) - max_len
  if excess > 0 then
    local page = redis.call('XRANGE', S, '-', '+', 'COUNT', math.min(excess, batch))
    for _, e in ipairs(page) do
      if floor and idcmp(e[1], floor) < 0 then removed = removed + 1 else trimmed = trimmed + 1 end
      for _, info in ipairs(groups) do
        local gkey = gk(info[2])
        release_key(info[2], e[1])
        redis.call('ZREM', gkey .. 'sched', e[1])
        redis.call('ZREM', gkey .. 'held', e[1])
        redis.call('ZREM', gkey .. 'skip', e[1])
        redis.call('SREM', gkey .. 'park', e[1])
        redis.call('HDEL', gkey .. 'm', e[1])
        redis.pcall('XACK', S, info[2], e[1])
      end
      redis.call('XDEL', S, e[1])
    end
  end
end
return {removed, trimmed}
"#;

/// Replays dead letters, atomically per dead letter. ARGV: prefix, then per dead letter: id,
/// type, data, headers json. Returns {dead letter id, new message id} pairs for those that
/// existed.
pub(super) const REPLAY: &str = r#"
if not topic_exists() then return {} end
local out = {}
for i = 2, #ARGV, 4 do
  if redis.call('XDEL', P .. 'dl', ARGV[i]) == 1 then
    local id
    local ok, h = pcall(cjson.decode, ARGV[i + 3])
    local k = ok and type(h) == 'table' and h['relq-ordering-key']
    if type(k) == 'string' and k ~= '' then
      mark_keyed()
      id = redis.call('XADD', S, '*', 'type', ARGV[i + 1], 'data', ARGV[i + 2], 'headers', ARGV[i + 3], 'key', k)
    else
      id = redis.call('XADD', S, '*', 'type', ARGV[i + 1], 'data', ARGV[i + 2], 'headers', ARGV[i + 3])
    end
    out[#out + 1] = {ARGV[i], id}
  end
end
return out
"#;

/// Creates a group with no consumer. ARGV: prefix, group, start id ('$', '0' or an id). Returns
/// 1 if it was created, 0 if it existed.
pub(super) const GROUP_CREATE: &str = r#"
local g, start = ARGV[2], ARGV[3]
if redis.call('EXISTS', P .. 'meta') == 0 then
  redis.call('HSET', P .. 'meta', 'epoch', new_epoch())
end
redis.call('SREM', P .. 'deleted', g)
local r = redis.pcall('XGROUP', 'CREATE', S, g, start, 'MKSTREAM')
if type(r) == 'table' and r.err then
  if string.find(r.err, 'BUSYGROUP') then return 0 end
  return r
end
keys_start(g, start)
return 1
"#;

/// Deletes a group and its keys, and marks it deleted so its running consumers stop instead of
/// creating it again (a join clears the mark). ARGV: prefix, group. Returns whether it existed.
pub(super) const GROUP_DELETE: &str = r#"
local g = ARGV[2]
if redis.call('EXISTS', S) == 0 then return 0 end
local r = redis.call('XGROUP', 'DESTROY', S, g)
del_group_keys(g)
if r == 1 then redis.call('SADD', P .. 'deleted', g) end
return r
"#;

/// Moves a group's last-delivered id. ARGV: prefix, group, to ('$', '0' or an id). Moving back,
/// the entries after `to` the group holds (pending, scheduled, parked) go into the group's skip
/// set, so a read that meets them again passes over them (see SKIP). Returns whether the group
/// exists.
pub(super) const GROUP_MOVE: &str = r#"
local g, to = ARGV[2], ARGV[3]
if redis.call('EXISTS', S) == 0 then return 0 end
local last = nil
for _, info in ipairs(redis.call('XINFO', 'GROUPS', S)) do
  local name, l
  for j = 1, #info, 2 do
    if info[j] == 'name' then name = info[j + 1] end
    if info[j] == 'last-delivered-id' then l = info[j + 1] end
  end
  if name == g then last = l end
end
if not last then return 0 end
if to == '$' then
  local st = redis.call('XINFO', 'STREAM', S)
  for j = 1, #st, 2 do
    if st[j] == 'last-generated-id' then to = st[j + 1] end
  end
elseif to == '0' then
  to = '0-0'
end
local gkey = gk(g)
local skip = gkey .. 'skip'
if idcmp(to, last) < 0 then
  local from = '(' .. to
  while true do
    local page = redis.call('XPENDING', S, g, from, last, 1000)
    for _, p in ipairs(page) do redis.call('ZADD', skip, idms(p[1]), p[1]) end
    if #page < 1000 then break end
    from = '(' .. page[#page][1]
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', gkey .. 'held', idms(to), idms(last))) do
    if idcmp(id, to) > 0 and idcmp(id, last) <= 0 then redis.call('ZADD', skip, idms(id), id) end
  end
else
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', skip, '-inf', idms(to))) do
    if idcmp(id, to) <= 0 then redis.call('ZREM', skip, id) end
  end
end
redis.call('XGROUP', 'SETID', S, g, to)
-- Entries after `to` are read again (or, moving forward, never): their keys are checked from
-- there (those the group holds are in `ki` already and keep their place).
redis.call('SET', gkey .. 'kc', to)
return 1
"#;

/// Screens entries a read delivered again after a move back. ARGV: prefix, group, epoch, then
/// ids. Each id in the skip set leaves it and is passed over: one held (scheduled, parked) is
/// acknowledged again in the pending list (it stays held), one in flight elsewhere stays pending
/// (its holder settles it; if it died, a claim delivers it). Returns the ids passed over.
pub(super) const SKIP: &str = r#"
local g = ARGV[2]
if ended(ARGV[3]) then return redis.error_reply('RELQ_TERMINATED the topic was terminated') end
local gkey = gk(g)
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', gkey .. 'skip', id) == 1 then
    if redis.call('ZSCORE', gkey .. 'held', id) then redis.call('XACK', S, g, id) end
    out[#out + 1] = id
  end
end
return out
"#;

/// The full source of a script: the prelude, then its body.
pub(super) fn source(body: &str) -> String {
    let mut s = String::with_capacity(PRELUDE.len() + body.len());
    s.push_str(PRELUDE);
    s.push_str(body);
    s
}
