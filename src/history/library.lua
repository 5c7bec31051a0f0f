#!lua name=__LIBRARY__
-- Durable publishing for sse-gateway, loaded by every replica at start-up (FUNCTION LOAD
-- REPLACE) with its own settings filled in. One call stores the event in the channel's capped
-- stream and publishes it with its id, atomically.
--   FCALL __FUNCTION__ 1 {__PREFIX__<channel>} <payload>
-- The key is the channel's pub/sub name in braces: on a Redis Cluster the history keys then sit
-- on the slot of the shard channel the event is published to.
-- returns { epoch, id }.
local PREFIX = '__PREFIX__'
local MAXLEN = __MAXLEN__
local TTL_MS = __TTL_MS__
local MAX_BYTES = __MAX_BYTES__

local function check(payload)
  if #payload > MAX_BYTES then
    return 'payload is ' .. #payload .. ' bytes; SSE_GATEWAY_MAX_EVENT_BYTES allows ' .. MAX_BYTES
  end
  if string.sub(payload, 1, 1) == '\0' then
    return 'payloads starting with a NUL byte are reserved for the gateway'
  end
  if string.find(payload, '^%s*{') then
    local ok, obj = pcall(cjson.decode, payload)
    if ok and type(obj) == 'table' and obj['data'] ~= nil and type(obj['event']) == 'string' then
      local ev = obj['event']
      if #ev > 256 then return 'event name is longer than 256 bytes' end
      if string.find(ev, '[\r\n%z]') then return 'event name contains CR, LF or NUL' end
      if string.sub(ev, 1, 8) == 'gateway.' then return 'event names starting with gateway. are reserved' end
    end
  end
  return nil
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
  if #channel > 200 or string.find(channel, '[^!-~]') or string.find(channel, '[%*,{}]') then
    return redis.error_reply('ERR the channel in {' .. PREFIX .. '<channel>} must be 1-200 printable ASCII characters without space * , { }')
  end
  local payload = args[1]
  if payload == nil then
    return redis.error_reply('ERR give the payload after the key')
  end
  local problem = check(payload)
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
  if length >= MAXLEN then
    local going = redis.call('XRANGE', history, '-', '+', 'COUNT', length - MAXLEN + 1)
    redis.call('SET', trimmed_key, going[#going][1])
  end
  local id = redis.call('XADD', history, 'MAXLEN', MAXLEN, '*', 'p', payload)
  redis.call('PEXPIRE', history, TTL_MS)
  redis.call('PEXPIRE', epoch_key, TTL_MS)
  if redis.call('EXISTS', trimmed_key) == 1 then redis.call('PEXPIRE', trimmed_key, TTL_MS) end
  redis.call('__PUBLISH__', PREFIX .. channel, '\0D1\0' .. epoch .. '\0' .. id .. '\0' .. payload)
  return { epoch, id }
end

redis.register_function('__FUNCTION__', publish)
