from test_part_watch import *
from test_part_watch import FILTER_WITH_ENTRYPOINT, submit_job, gauges, open_stream, FILTER, timed

def test_probe(start_dispatcher, namespace):
    d = start_dispatcher(FILTER_WITH_ENTRYPOINT)
    f = submit_job(d, "true", tag="failed", status=502, entrypoint=["/no/such/binary"])
    print(d.request("GET", "/jobs?state=pending").json)
    print(gauges(d, namespace))
    r = submit_job(d, "sleep 20", tag="r")
    print(timed(d, "HEAD", f"/job/{r}/logs?follow=true", timeout=30))
