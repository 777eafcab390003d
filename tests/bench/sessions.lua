-- wrk script: keep-alive GETs cycling through N session cookies (`sid=s0` .. `sid=s<N-1>`).
-- wrk ... -s sessions.lua URL -- N [close]
-- With `close`, every request says `Connection: close`: one request per connection (wrk's -H
-- does not reach requests a script formats).
local n, sessions = 0, 1000
local requests = {}

function init(args)
  sessions = tonumber(args[1]) or 1000
  -- Pre-format every request once: the load generator's own cost stays small and the same for
  -- every target.
  local close = args[2] == "close"
  for i = 0, sessions - 1 do
    local headers = { ["Cookie"] = "sid=s" .. i }
    if close then
      headers["Connection"] = "close"
    end
    requests[i] = wrk.format("GET", "/", headers)
  end
end

function request()
  n = (n + 1) % sessions
  return requests[n]
end
