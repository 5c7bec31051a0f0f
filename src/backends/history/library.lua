-- Durable publishing for sse-gateway. One call stores the event in the channel's capped stream
-- and publishes it with its id, atomically:
--   FCALL <FUNCTION> 1 {<PREFIX><channel>} <payload> [<maxlen> <ttl ms> <max bytes>]
-- The constants this file uses (VERSION, KEY_HEX, PREFIX, the defaults, PUBLISH, FUNCTION,
-- INFO, MARKER and the naming rules) are written above it by the gateway, from its own Rust
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

local function publish(keys, args)
  local tag = keys[1]
  local channel = nil
  if tag and #tag > #PREFIX + 2 and string.sub(tag, 1, #PREFIX + 1) == '{' .. PREFIX and string.sub(tag, -1) == '}' then
    channel = string.sub(tag, #PREFIX + 2, -2)
  end
  if not channel then
    return redis.error_reply('ERR the key must be {' .. PREFIX .. '<channel>}, for example {' .. PREFIX .. 'orders}')
  end
  if #channel > MAX_CHANNEL_BYTES or string.find(channel, '[^!-~]') or string.find(channel, '[%*,{}]') then
    return redis.error_reply('ERR the channel in {' .. PREFIX .. '<channel>} must be 1-' .. MAX_CHANNEL_BYTES .. ' printable ASCII characters without space * , { }')
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
    local t = redis.call('TIME')
    local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if lms and tonumber(lms) >= now_ms then
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

local function info(keys, args)
  return { VERSION, KEY_HEX }
end

redis.register_function(FUNCTION, publish)
redis.register_function{function_name = INFO, callback = info, flags = {'no-writes'}}
