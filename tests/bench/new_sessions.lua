-- wrk script: every request carries a session cookie never seen before (`sid=<prefix>-<n>`).
-- wrk ... -s new_sessions.lua URL -- PREFIX   (a prefix unique to the run)
local n, prefix = 0, "x"

function init(args)
  prefix = args[1] or tostring(math.random(1, 1e9))
end

function request()
  n = n + 1
  return wrk.format("GET", "/", { ["Cookie"] = "sid=" .. prefix .. "-" .. n })
end
