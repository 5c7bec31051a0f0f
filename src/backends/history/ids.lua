-- Stream id comparison shared by the history scripts (prepended to each when it is built).
-- Exact comparison of decimal strings (Lua numbers are doubles: 64-bit ids lose precision).
local function num_cmp(a, b)
  a = string.gsub(a, '^0+(%d)', '%1')
  b = string.gsub(b, '^0+(%d)', '%1')
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a ~= b then return a < b and -1 or 1 end
  return 0
end
-- -1, 0 or 1 as stream id `a` ("ms-seq") sorts before, with or after `b`.
local function cmp(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  local c = num_cmp(am, bm)
  if c ~= 0 then return c end
  return num_cmp(as, bs)
end
