-- wrk script: send absolute-form requests for the origin's tiny body to a proxy.
local origin = os.getenv("BENCH_ORIGIN")
wrk.path = "http://" .. origin .. "/tiny"
wrk.headers["Host"] = origin
