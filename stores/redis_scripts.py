"""The Lua scripts of the Redis store (stores/redis.py): every write that touches several keys
runs as one script, so an entry, its indexes and the running totals never disagree.

Each takes the key prefix as ARGV[1] and builds the names of the keys it touches itself (the
layout is described in stores/redis.py), so they run on a single Redis, not a Cluster. Times
travel as text: Lua would round numbers to 14 digits.
"""

from cache_store import NEVER_EXPIRES

# Scripts that write declare it (Redis 7 flags): a full Redis (maxmemory, noeviction) then
# refuses a store before its first command, never halfway through; the ones that only free
# memory are allowed to run even then.
WRITES = "#!lua\n"
FREES_MEMORY = "#!lua flags=allow-oom\n"

# HINCRBY of a Lua number: Lua writes minus zero as "-0", which Redis refuses as an integer.
_LUA_ADD = """
local function add(hash, field, amount)
  if amount ~= 0 then redis.call('HINCRBY', hash, field, amount) end
end
"""

# Removes one entry and everything that points at it; ``P`` and ``key`` are set by the caller.
_LUA_REMOVE = _LUA_ADD + """
local function remove(P, key)
  local meta = redis.call('HGET', P .. 'meta', key)
  if not meta then
    return redis.call('DEL', P .. 'e:' .. key)
  end
  local m = cjson.decode(meta)
  local hits = tonumber(redis.call('ZSCORE', P .. 'i:hits', key) or '0')
  redis.call('DEL', P .. 'e:' .. key)
  redis.call('HDEL', P .. 'meta', key)
  for _, index in ipairs({'i:updated', 'i:recency', 'i:hits', 'i:own', 'i:created'}) do
    redis.call('ZREM', P .. index, key)
  end
  redis.call('ZREM', P .. 'i:model:' .. m[2], key)
  redis.call('ZREM', P .. 'i:ns:' .. m[3], key)
  if m[4] ~= '' then redis.call('ZREM', P .. 'near:' .. m[4], key) end
  add(P .. 'counters', 'entries', -1)
  add(P .. 'counters', 'stored_bytes', -tonumber(m[1]))
  add(P .. 'counters', 'hits', -hits)
  return 1
end
"""

# Writes one entry with its indexes and counters. A live entry keeps created_at, hits and its
# last hit; an expired one (or one whose hash Redis already dropped) starts again from zero.
# ARGV: prefix, key, now, server ttl, own expires_at ('' = the server's TTL), mode, model,
# request, response, namespace ('' = default), prompt/completion tokens, cost, upstream seconds,
# size, near group ('' = none), near fingerprints, grace ms, only_if_absent ('1': import),
# created_at/updated_at to use ('' = now; import), unpriced ('1': the price table had no cost).
PUT = WRITES + _LUA_ADD + """
local P, key, now_s = ARGV[1], ARGV[2], ARGV[3]
local now, ttl = tonumber(now_s), tonumber(ARGV[4])
local own_s, model, ns, group, fp = ARGV[5], ARGV[7], ARGV[10], ARGV[16], ARGV[17]
local e = P .. 'e:' .. key
local meta = redis.call('HGET', P .. 'meta', key)
if meta and ARGV[19] == '1' then return 'present' end
local created_s, updated_s = ARGV[20], ARGV[21]
if created_s == '' then created_s = now_s end
if updated_s == '' then updated_s = now_s end
local outcome, hits, last_hit = 'stored', '0', false
redis.call('HSETNX', P .. 'counters', 'since', now_s)
if meta then
  local m = cjson.decode(meta)
  local old = redis.call('HMGET', e, 'created_at', 'expires_at', 'last_hit_at', 'hits', 'near_fp')
  -- re-stored without a near record (an exact-mode store of the same request): it keeps its own
  if group == '' and m[4] ~= '' and old[5] then group, fp = m[4], old[5] end
  local live = false
  if old[1] then
    local oc, oe = tonumber(old[1]), tonumber(old[2])
    if oe then live = now <= oe elseif ttl > 0 then live = now - oc <= ttl else live = true end
  end
  if live then
    outcome, created_s, hits, last_hit = 'updated', old[1], old[4] or '0', old[3]
  else
    add(P .. 'counters', 'hits', -tonumber(redis.call('ZSCORE', P .. 'i:hits', key) or '0'))
  end
  add(P .. 'counters', 'stored_bytes', -tonumber(m[1]))
  if m[2] ~= model then redis.call('ZREM', P .. 'i:model:' .. m[2], key) end
  if m[3] ~= ns then redis.call('ZREM', P .. 'i:ns:' .. m[3], key) end
  if m[4] ~= '' and m[4] ~= group then redis.call('ZREM', P .. 'near:' .. m[4], key) end
else
  redis.call('HINCRBY', P .. 'counters', 'entries', 1)
end
redis.call('DEL', e)
local fields = {'mode', ARGV[6], 'model', model, 'request_json', ARGV[8], 'response_json', ARGV[9],
  'created_at', created_s, 'updated_at', updated_s, 'hits', hits, 'expires_at', own_s,
  'namespace', ns, 'prompt_tokens', ARGV[11], 'completion_tokens', ARGV[12], 'cost_usd', ARGV[13],
  'upstream_seconds', ARGV[14], 'size', ARGV[15], 'unpriced', ARGV[22]}
if last_hit then table.insert(fields, 'last_hit_at'); table.insert(fields, last_hit) end
if group ~= '' then
  table.insert(fields, 'near_group'); table.insert(fields, group)
  table.insert(fields, 'near_fp'); table.insert(fields, fp)
end
redis.call('HSET', e, unpack(fields))
local own, created = tonumber(own_s), tonumber(created_s)
local deadline = nil
if own then
  redis.call('ZREM', P .. 'i:created', key)
  if own < NEVER then
    deadline = own
    redis.call('ZADD', P .. 'i:own', own_s, key)
  else
    redis.call('ZREM', P .. 'i:own', key)
  end
else
  redis.call('ZREM', P .. 'i:own', key)
  redis.call('ZADD', P .. 'i:created', created_s, key)
  if ttl > 0 then deadline = created + ttl end
end
if deadline then
  redis.call('PEXPIRE', e, math.max(1, math.floor((deadline - now) * 1000) + tonumber(ARGV[18])))
end
local updated = tonumber(updated_s)
redis.call('ZADD', P .. 'i:updated', updated_s, key)
redis.call('ZADD', P .. 'i:model:' .. model, updated_s, key)
redis.call('ZADD', P .. 'i:ns:' .. ns, updated_s, key)
redis.call('ZADD', P .. 'i:recency', last_hit or updated_s, key)
redis.call('ZADD', P .. 'i:hits', hits, key)
if group ~= '' then redis.call('ZADD', P .. 'near:' .. group, updated_s, key) end
redis.call('HSET', P .. 'meta', key, cjson.encode({tonumber(ARGV[15]), model, ns, group}))
redis.call('HINCRBY', P .. 'counters', 'stored_bytes', tonumber(ARGV[15]))
return outcome
""".replace("NEVER", repr(NEVER_EXPIRES))

# Adds hits counted in memory: to the entry, its recency, and the savings totals (in all, of its
# model and of its API, the entry's mode; hits on an unpriced entry are counted apart).
# ARGV: prefix, then (key, count, last hit time) triples.
HITS = WRITES + _LUA_ADD + """
local P = ARGV[1]
for i = 2, #ARGV, 3 do
  local key, count, last_s = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local e = P .. 'e:' .. key
  local f = redis.call('HMGET', e, 'model', 'prompt_tokens', 'completion_tokens', 'cost_usd',
                       'upstream_seconds', 'last_hit_at', 'mode', 'unpriced')
  if f[1] then
    redis.call('HINCRBY', e, 'hits', count)
    if not tonumber(f[6]) or tonumber(f[6]) < tonumber(last_s) then
      redis.call('HSET', e, 'last_hit_at', last_s)
      redis.call('ZADD', P .. 'i:recency', last_s, key)
    end
    redis.call('ZINCRBY', P .. 'i:hits', count, key)
    local c, m, a = P .. 'counters', P .. 'model:' .. f[1], P .. 'api:' .. (f[7] or '')
    local unpriced = f[8] == '1' and count or 0
    redis.call('HINCRBY', c, 'hits', count)
    redis.call('SADD', P .. 'models', f[1])
    redis.call('SADD', P .. 'apis', f[7] or '')
    for _, target in ipairs({c, m, a}) do
      redis.call('HINCRBY', target, target == c and 'hits_served' or 'hits', count)
      redis.call('HINCRBY', target, 'prompt_tokens_saved', count * tonumber(f[2] or '0'))
      redis.call('HINCRBY', target, 'completion_tokens_saved', count * tonumber(f[3] or '0'))
      redis.call('HINCRBYFLOAT', target, 'cost_saved_usd', count * tonumber(f[4] or '0'))
      redis.call('HINCRBYFLOAT', target, 'time_saved_seconds', count * tonumber(f[5] or '0'))
    end
    add(c, 'unpriced_hits', unpriced)
    add(a, 'unpriced_hits', unpriced)
  end
end
return 1
"""


# ARGV: prefix, keys...: how many entries were removed.
DELETE = FREES_MEMORY + _LUA_REMOVE + """
local removed = 0
for i = 2, #ARGV do removed = removed + remove(ARGV[1], ARGV[i]) end
return removed
"""

# Removes up to ARGV[4] expired entries: an own deadline before ARGV[2], or (when ARGV[3] is not
# empty) a store before ARGV[3] = now - the server's TTL. Times are passed as text: Lua would
# round numbers to 14 digits.
PURGE = FREES_MEMORY + _LUA_REMOVE + """
local P, batch = ARGV[1], tonumber(ARGV[4])
local removed = 0
local own = redis.call('ZRANGEBYSCORE', P .. 'i:own', '-inf', '(' .. ARGV[2], 'LIMIT', 0, batch)
for _, key in ipairs(own) do removed = removed + remove(P, key) end
if ARGV[3] ~= '' and removed < batch then
  local old = redis.call('ZRANGEBYSCORE', P .. 'i:created', '-inf', '(' .. ARGV[3], 'LIMIT', 0, batch - removed)
  for _, key in ipairs(old) do removed = removed + remove(P, key) end
end
return removed
"""

# Removes least-recently-used entries while over a bound, at most ARGV[4] of them, never one of
# the keys after it (hit in the caller's memory since its last flush).
# ARGV: prefix, max entries (0 = none), max bytes (0 = none), batch, keys to spare...
EVICT = FREES_MEMORY + _LUA_REMOVE + """
local P, max_entries, max_bytes, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local spare = {}
for i = 5, #ARGV do spare[ARGV[i]] = true end
local counts = redis.call('HMGET', P .. 'counters', 'entries', 'stored_bytes')
local excess_entries = max_entries > 0 and tonumber(counts[1] or '0') - max_entries or 0
local excess_bytes = max_bytes > 0 and tonumber(counts[2] or '0') - max_bytes or 0
if excess_entries <= 0 and excess_bytes <= 0 then return 0 end
local removed = 0
for _, key in ipairs(redis.call('ZRANGE', P .. 'i:recency', 0, batch - 1)) do
  if excess_entries <= 0 and excess_bytes <= 0 then break end
  if not spare[key] then
    local meta = redis.call('HGET', P .. 'meta', key)
    local size = meta and tonumber(cjson.decode(meta)[1]) or 0
    removed = removed + remove(P, key)
    excess_entries = excess_entries - 1
    excess_bytes = excess_bytes - size
  end
end
return removed
"""

# Leader of a coalesced flight lets go: only its own lease, then tells the followers.
# KEYS: lease, channel; ARGV: token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], 'done')
  return 1
end
return 0
"""

# KEYS: leases...; ARGV: lease ms, tokens...: renews the leases this process still holds.
RENEW = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 1
"""
