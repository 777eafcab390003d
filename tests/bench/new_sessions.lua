-- wrk script: every request carries a session cookie never seen before (`sid=<prefix>-<n>`).
-- wrk ... -s new_sessions.lua URL -- PREFIX   (a prefix unique to the run)
local n = 0
local head, tail = "", "\r\n\r\n"

function init(args)
  local prefix = args[1] or tostring(math.random(1, 1e9))
  -- The request up to the cookie's counter, formatted once (as sessions.lua formats its
  -- requests once): per request only the counter and the end of the head are appended, so the
  -- load generator costs about what it costs in s1 and the s2/s1 ratio measures the proxy.
  -- wrk.format per request (a table, string.format per header, a concat) cost wrk ~5 us more
  -- per request than s1's script on the 2-core machine, where it shares the cores.
  -- The Cookie header goes last, after what wrk.format writes (Host), so that the counter and
  -- the blank line can follow it.
  local req = wrk.format("GET", "/", {})
  head = req:sub(1, #req - 2) .. "Cookie: sid=" .. prefix .. "-"
end

function request()
  n = n + 1
  return head .. n .. tail
end
