-- Durable publishing for sse-gateway. One call stores the event in the channel's capped stream
-- and publishes it with its id, atomically:
--   FCALL <FUNCTION> 1 {<PREFIX><channel>} <payload> [<maxlen> <ttl ms> <max bytes>]
-- The constants this file uses (VERSION, KEY_HEX, PREFIX, the defaults, PUBLISH, FUNCTION,
-- PRESENCE, INFO, MARKER, PRESENCE_MARKER and the naming rules) are written above it by the gateway, from its own Rust
-- constants, when it loads the library (history/redis.rs, `Library::source`).
-- The key is the channel's pub/sub name in braces: on a Redis Cluster the history keys then sit
-- on the slot of the shard channel the event is published to. Replicas pass their settings as
-- arguments; a publisher with only redis-cli leaves them out and gets the defaults below (those
-- of the replica that loaded this library). Returns { epoch, id }.
--
-- The published message is `\0D2\0<mac>\0<epoch>\0<id>\0<payload>`, where <mac> is the hex
-- HMAC-SHA1, under the key KEY_HEX, of `<channel>\0<epoch>\0<id>\0<payload>`. Replicas move a
-- stream's position only for a message whose MAC verifies, so a raw PUBLISH (which cannot know
-- the key) can never forge, suppress or reorder a durable event.
--
-- INFO answers { version, key }: replicas adopt the key of the library in place, and never
-- replace a library whose version is newer than theirs.
-- Hex pair -> byte, filled at the first call; gsub with a table calls no Lua function.
local BYTE = nil
local function bytes_of_hex(h)
  if not BYTE then
    BYTE = {}
    for i = 0, 255 do
      local b = string.char(i)
      BYTE[string.format('%02x', i)] = b
      BYTE[string.format('%02X', i)] = b
    end
  end
  return (string.gsub(h, '..', BYTE))
end

-- The padded keys, worked out at the first call (the standard libraries are not available
-- while a library loads).
local IPAD, OPAD
local function pads()
  local key = bytes_of_hex(KEY_HEX)
  key = key .. string.rep('\0', 64 - #key)
  local function xor(k, x)
    return (string.gsub(k, '.', function(c) return string.char(bit.bxor(string.byte(c), x)) end))
  end
  return xor(key, 0x36), xor(key, 0x5c)
end

local function mac(message)
  if not IPAD then IPAD, OPAD = pads() end
  return redis.sha1hex(OPAD .. bytes_of_hex(redis.sha1hex(IPAD .. message)))
end

local function check(payload, max_bytes)
  if #payload > max_bytes then
    return 'payload is ' .. #payload .. ' bytes; SSE_GATEWAY_MAX_EVENT_BYTES allows ' .. max_bytes
  end
  if string.sub(payload, 1, 1) == '\0' then
    return 'payloads starting with a NUL byte are reserved for the gateway'
  end
  if string.find(payload, '^%s*{') then
    local ok, obj = pcall(cjson.decode, payload)
    if ok and type(obj) == 'table' and obj['data'] ~= nil and type(obj['event']) == 'string' then
      local ev = obj['event']
      if #ev > MAX_EVENT_NAME_BYTES then return 'event name is longer than ' .. MAX_EVENT_NAME_BYTES .. ' bytes' end
      if string.find(ev, '[\r\n%z]') then return 'event name contains CR, LF or NUL' end
      if string.sub(ev, 1, #RESERVED_PREFIX) == RESERVED_PREFIX then return 'event names starting with ' .. RESERVED_PREFIX .. ' are reserved' end
    end
  end
  return nil
end

local function setting(value, default, name)
  if value == nil then return default end
  local n = tonumber(value)
  if n == nil or n < 0 or n ~= math.floor(n) then
    error('ERR ' .. name .. ' must be a whole number, got ' .. tostring(value))
  end
  return n
end

-- The channel named by a key `{<PREFIX><channel>}`, or nil.
local function channel_of(tag)
  if tag and #tag > #PREFIX + 2 and string.sub(tag, 1, #PREFIX + 1) == '{' .. PREFIX and string.sub(tag, -1) == '}' then
    local channel = string.sub(tag, #PREFIX + 2, -2)
    if #channel <= MAX_CHANNEL_BYTES and not string.find(channel, '[^!-~]') and not string.find(channel, '[%*,{}]') then
      return channel
    end
  end
  return nil
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Stores a payload in the channel's capped stream and publishes it signed; { epoch, id }.
local function store(tag, channel, payload, maxlen, ttl_ms)
  local history = tag .. ':history'
  local epoch_key = tag .. ':epoch'
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    local t = redis.call('TIME')
    epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
    redis.call('SET', epoch_key, epoch)
  end
  -- Remember the newest position trimming removes, so that a reader whose cursor is older
  -- knows it missed events (XINFO's max-deleted-entry-id does not count trimming).
  local trimmed_key = tag .. ':trimmed'
  local length = redis.call('XLEN', history)
  if length >= maxlen then
    local going = redis.call('XRANGE', history, '-', '+', 'COUNT', length - maxlen + 1)
    redis.call('SET', trimmed_key, going[#going][1])
  end
  -- A position recorded as lost (lost.lua) may lie ahead of this server's clock (a failover to
  -- a replica whose clock is behind): new events must sort after it, or streams that saw the
  -- lost event would take them for duplicates.
  local lost_key = tag .. ':lost'
  local lost = redis.call('GET', lost_key)
  local id_arg = '*'
  if lost then
    local lms, lseq = string.match(lost, '^(%d+)-(%d+)$')
    if lms and tonumber(lms) >= now_ms() then
      id_arg = lms .. '-' .. (tonumber(lseq) + 1)
    end
  end
  local id
  if id_arg == '*' then
    id = redis.call('XADD', history, 'MAXLEN', maxlen, '*', 'p', payload)
  else
    id = redis.pcall('XADD', history, 'MAXLEN', maxlen, id_arg, 'p', payload)
    if type(id) == 'table' and id.err then
      -- Events already sort after it: the server's own id is right.
      id = redis.call('XADD', history, 'MAXLEN', maxlen, '*', 'p', payload)
    end
  end
  redis.call('PEXPIRE', history, ttl_ms)
  redis.call('PEXPIRE', epoch_key, ttl_ms)
  if redis.call('EXISTS', trimmed_key) == 1 then redis.call('PEXPIRE', trimmed_key, ttl_ms) end
  if lost then redis.call('PEXPIRE', lost_key, ttl_ms) end
  local signed = channel .. '\0' .. epoch .. '\0' .. id .. '\0' .. payload
  redis.call(PUBLISH, PREFIX .. channel, MARKER .. mac(signed) .. '\0' .. epoch .. '\0' .. id .. '\0' .. payload)
  return { epoch, id }
end

local function publish(keys, args)
  local tag = keys[1]
  local channel = channel_of(tag)
  if not channel then
    return redis.error_reply('ERR the key must be {' .. PREFIX .. '<channel>} with a channel of 1-' .. MAX_CHANNEL_BYTES .. ' printable ASCII characters without space * , { }, for example {' .. PREFIX .. 'orders}')
  end
  local payload = args[1]
  if payload == nil then
    return redis.error_reply('ERR give the payload after the key')
  end
  local maxlen = setting(args[2], DEFAULT_MAXLEN, 'maxlen')
  local ttl_ms = setting(args[3], DEFAULT_TTL_MS, 'ttl ms')
  local max_bytes = setting(args[4], DEFAULT_MAX_BYTES, 'max bytes')
  if maxlen < 1 or ttl_ms < 1 then
    return redis.error_reply('ERR maxlen and ttl ms must be at least 1')
  end
  local problem = check(payload, max_bytes)
  if problem then
    return redis.error_reply('ERR ' .. problem)
  end
  return store(tag, channel, payload, maxlen, ttl_ms)
end

-- Presence: who is on a channel, kept beside its history (same hash tag, same Cluster slot).
--   FCALL <PRESENCE> 1 {<PREFIX><channel>} <op> <maxlen> <ttl ms> <grace ms> [op arguments]
-- Keys: <tag>:members HASH "<replica>:<stream>" -> sub (one entry per stream);
--       <tag>:users HASH sub -> entries; <tag>:reps HASH replica -> entries;
--       <tag>:away ZSET sub -> when their leave is due (last stream gone, grace running).
-- A user is present while they have entries or a leave is pending. Transitions are stored in
-- history in the same step (a join when a user's first entry appears and no leave was pending;
-- a leave when a pending leave falls due and they have no entry), so they are durable, ordered
-- with the channel's events, and never doubled by several streams or a quick reconnect.
-- Entries are tied to replica leases, not heartbeats: a dead replica's entries are removed
-- by `sweep` (called by a live replica, with a fresh read of the registry), and `snapshot`
-- leaves out entries of replicas whose lease has passed.
local function presence_event(tag, channel, kind, sub, maxlen, ttl_ms)
  return store(tag, channel, PRESENCE_MARKER .. kind .. '\0' .. sub, maxlen, ttl_ms)
end

local function next_due(away)
  local first = redis.call('ZRANGE', away, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return -1
end

-- Announces every pending leave that is due; { leaves, next due or -1, now }.
local function settle(tag, channel, maxlen, ttl_ms, now)
  local away = tag .. ':away'
  local users = tag .. ':users'
  local leaves = 0
  for _, sub in ipairs(redis.call('ZRANGEBYSCORE', away, '-inf', now)) do
    redis.call('ZREM', away, sub)
    if redis.call('HEXISTS', users, sub) == 0 then
      presence_event(tag, channel, 'leave', sub, maxlen, ttl_ms)
      leaves = leaves + 1
    end
  end
  return { leaves, next_due(away), now }
end

-- Removes one entry; when it was its user's last, their leave is due after the grace.
local function drop_entry(tag, member, sub, grace_ms, now)
  local replica = string.match(member, '^([^:]+):') or member
  redis.call('HDEL', tag .. ':members', member)
  if redis.call('HINCRBY', tag .. ':reps', replica, -1) <= 0 then
    redis.call('HDEL', tag .. ':reps', replica)
  end
  if redis.call('HINCRBY', tag .. ':users', sub, -1) <= 0 then
    redis.call('HDEL', tag .. ':users', sub)
    redis.call('ZADD', tag .. ':away', now + grace_ms, sub)
  end
end

-- Adds one entry; a join when it is its user's first and no leave of theirs was pending.
-- The join's { epoch, id }, or nil.
local function add_entry(tag, channel, member, sub, maxlen, ttl_ms)
  if redis.call('HSETNX', tag .. ':members', member, sub) == 0 then return nil end
  redis.call('HINCRBY', tag .. ':reps', string.match(member, '^([^:]+):'), 1)
  if redis.call('HINCRBY', tag .. ':users', sub, 1) > 1 then return nil end
  -- Back within the grace: the pending leave is withdrawn, and nobody saw them go.
  if redis.call('ZREM', tag .. ':away', sub) == 1 then return nil end
  return presence_event(tag, channel, 'join', sub, maxlen, ttl_ms)
end

local function presence(keys, args)
  local tag = keys[1]
  local channel = channel_of(tag)
  if not channel then
    return redis.error_reply('ERR the key must be {' .. PREFIX .. '<channel>}')
  end
  local op = args[1]
  local maxlen = setting(args[2], DEFAULT_MAXLEN, 'maxlen')
  local ttl_ms = setting(args[3], DEFAULT_TTL_MS, 'ttl ms')
  local grace_ms = setting(args[4], 5000, 'grace ms')
  if maxlen < 1 or ttl_ms < 1 then
    return redis.error_reply('ERR maxlen and ttl ms must be at least 1')
  end
  local members = tag .. ':members'
  local users = tag .. ':users'
  local away = tag .. ':away'
  local now = now_ms()
  if op == 'join' or op == 'reassert' then
    -- join: one entry (ARGV[5] member, ARGV[6] sub); reassert: pairs of them, put back after
    -- Redis lost them (a restart, a failover), joins told for users who are back this way.
    -- Returns { joins, epoch, id } (the last join's position, when there was one).
    local joins, mark = 0, nil
    for i = 5, #args, 2 do
      local member, sub = args[i], args[i + 1]
      if not sub or not string.find(member, '^[^:]+:') then
        return redis.error_reply('ERR ' .. op .. ' takes pairs of <replica>:<stream> and sub')
      end
      local m = add_entry(tag, channel, member, sub, maxlen, ttl_ms)
      if m then
        joins = joins + 1
        mark = m
      end
    end
    if mark then return { joins, mark[1], mark[2] } end
    return { joins }
  elseif op == 'leave' then
    local member = args[5]
    local sub = member and redis.call('HGET', members, member)
    if sub then drop_entry(tag, member, sub, grace_ms, now) end
    return settle(tag, channel, maxlen, ttl_ms, now)
  elseif op == 'settle' then
    return settle(tag, channel, maxlen, ttl_ms, now)
  elseif op == 'sweep' then
    -- ARGV[5] a replica, ARGV[6] its lease expiry as read at ARGV[7] (ms, Redis clock),
    -- ARGV[8] how old that read may be: only a fresh read can tell a dead replica from one
    -- that renewed since.
    local dead, expiry, read_at, fresh = args[5], tonumber(args[6]), tonumber(args[7]), tonumber(args[8])
    if not dead or not expiry or not read_at or not fresh then
      return redis.error_reply('ERR sweep takes the replica, its expiry, when that was read and how old it may be')
    end
    if now - read_at > fresh or expiry > now then
      return { -1, next_due(away), now }
    end
    if redis.call('HEXISTS', tag .. ':reps', dead) == 1 then
      local all = redis.call('HGETALL', members)
      local prefix = dead .. ':'
      for i = 1, #all, 2 do
        if string.sub(all[i], 1, #prefix) == prefix then
          drop_entry(tag, all[i], all[i + 1], grace_ms, now)
        end
      end
      redis.call('HDEL', tag .. ':reps', dead)
    end
    return settle(tag, channel, maxlen, ttl_ms, now)
  elseif op == 'snapshot' then
    -- ARGV[5] most members listed, ARGV[6..] pairs: replica, lease expiry (ms, Redis clock).
    local limit = tonumber(args[5]) or 1000
    local expiry = {}
    for i = 6, #args, 2 do expiry[args[i]] = tonumber(args[i + 1]) end
    local dead = {}
    local any_dead = false
    local reps = redis.call('HGETALL', tag .. ':reps')
    for i = 1, #reps, 2 do
      -- A replica the caller's copy does not know yet registered after it was read: live.
      if expiry[reps[i]] and expiry[reps[i]] <= now then
        dead[reps[i]] = true
        any_dead = true
      end
    end
    -- Entries of replicas whose lease passed are not counted (a sweep removes them soon).
    local gone = {}
    if any_dead then
      local all = redis.call('HGETALL', members)
      for i = 1, #all, 2 do
        local replica = string.match(all[i], '^([^:]+):')
        if replica and dead[replica] then gone[all[i + 1]] = (gone[all[i + 1]] or 0) + 1 end
      end
    end
    local list = {}
    local connections = 0
    local counts = redis.call('HGETALL', users)
    for i = 1, #counts, 2 do
      local n = math.max(0, tonumber(counts[i + 1]) - (gone[counts[i]] or 0))
      connections = connections + n
      list[#list + 1] = { counts[i], n }
    end
    -- Users whose leave is pending are still members (with no connection) until it is told.
    for _, sub in ipairs(redis.call('ZRANGE', away, 0, -1)) do
      list[#list + 1] = { sub, 0 }
    end
    table.sort(list, function(a, b) return a[1] < b[1] end)
    local epoch = redis.call('GET', tag .. ':epoch') or ''
    local last = redis.call('XREVRANGE', tag .. ':history', '+', '-', 'COUNT', 1)
    local position = '0-0'
    if last[1] then position = last[1][1] end
    local out = { epoch, position, #list, connections, #list > limit and 1 or 0 }
    for i = 1, math.min(limit, #list) do
      out[#out + 1] = list[i][1]
      out[#out + 1] = list[i][2]
    end
    return out
  end
  return redis.error_reply('ERR unknown presence operation; use join, reassert, leave, settle, sweep or snapshot')
end

local function info(keys, args)
  return { VERSION, KEY_HEX }
end

redis.register_function(FUNCTION, publish)
redis.register_function(PRESENCE, presence)
redis.register_function{function_name = INFO, callback = info, flags = {'no-writes'}}
