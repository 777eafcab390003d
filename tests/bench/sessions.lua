-- wrk script: keep-alive GETs cycling through N session cookies (`sid=s0` .. `sid=s<N-1>`).
-- wrk ... -s sessions.lua URL -- N
local n, sessions = 0, 1000
local requests = {}

function init(args)
  sessions = tonumber(args[1]) or 1000
  -- Pre-format every request once: the load generator's own cost stays small and the same for
  -- every target.
  for i = 0, sessions - 1 do
    requests[i] = wrk.format("GET", "/", { ["Cookie"] = "sid=s" .. i })
  end
end

function request()
  n = (n + 1) % sessions
  return requests[n]
end
