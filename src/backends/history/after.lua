-- Reads a channel's history after a position, and says whether it still reaches back there.
-- KEYS[1] the history stream, KEYS[2] its epoch key, KEYS[3] the newest trimmed position,
-- KEYS[4] the newest position lost in a failover
-- ARGV[1] the cursor's epoch ('*': any), ARGV[2] its position (ms-seq), ARGV[3] page size,
-- ARGV[4] the epoch that means "no history yet", ARGV[5] most payload bytes in the page
-- (at least one event is returned when the page size allows any, whatever its size)
-- Returns { current epoch, gap (0/1), entries, more (0/1) }.
-- cmp (ids.lua) is prepended.
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  local gap = 0
  if ARGV[1] ~= ARGV[4] and ARGV[1] ~= '*' then gap = 1 end
  return { ARGV[4], gap, {} }
end
local max_deleted = redis.call('GET', KEYS[3]) or '0-0'
-- Events recorded as lost in a failover count as removed too (lost.lua).
local lost = redis.call('GET', KEYS[4])
if lost and cmp(lost, max_deleted) > 0 then max_deleted = lost end
local last = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  -- Entries an operator removed with XDEL count as lost too.
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' and cmp(info[i + 1], max_deleted) > 0 then
      max_deleted = info[i + 1]
    end
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
end
local start = ARGV[2]
local gap = 0
if ARGV[1] == '*' then
  -- Any epoch: the caller only knows a time, not a cursor (filling after an outage).
  gap = 0
elseif epoch == ARGV[1] then
  if cmp(start, last) > 0 then
    -- A position this history never reached (forged, or lost in a failover): an honest gap,
    -- resuming from now.
    start = last
    gap = 1
  elseif cmp(max_deleted, start) > 0 then
    gap = 1
  end
elseif ARGV[1] == ARGV[4] then
  start = '0-0'
  if max_deleted ~= '0-0' then gap = 1 end
else
  start = '0-0'
  gap = 1
end
local limit = tonumber(ARGV[3])
local budget = tonumber(ARGV[5])
local entries = redis.call('XRANGE', KEYS[1], '(' .. start, '+', 'COUNT', limit + 1)
local page = {}
local bytes = 0
local more = 0
for i = 1, #entries do
  local size = 0
  local fields = entries[i][2]
  for f = 2, #fields, 2 do size = size + #fields[f] end
  if i > limit or (i > 1 and bytes + size > budget) then
    more = 1
    break
  end
  bytes = bytes + size
  page[i] = entries[i]
end
return { epoch, gap, page, more }
