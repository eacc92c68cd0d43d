"""The first calls after a reload, in fault rules: N services each with a FaultInjection of
their own (built in memory, not parsed), each one's fault rules asked once of a new Router;
best of 3, this thread's CPU. Run from the repository root (PYTHONPATH=<tree> for another
commit's meshlib): .venv/bin/python docs/results/policy-dir/faults/first_faults.py 2000 10000"""

import dataclasses
import sys
import time

from meshlib.config.loader import load_text
from meshlib.config.model import AbortFault, FaultRule, PolicyTarget, ServiceDef
from meshlib.policy.routing import Router

for count in map(int, sys.argv[1:]):
    services = {
        f"svc-{n}.ns-{n % 7}": ServiceDef(f"svc-{n}", f"ns-{n % 7}", ()) for n in range(count)
    }
    faults = tuple(
        FaultRule(f"f-{i}", key.partition(".")[2], PolicyTarget(service=key),
                  abort=AbortFault(503, 1.0))
        for i, key in enumerate(services)
    )
    empty = load_text("apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: m}\n")
    snapshot = dataclasses.replace(empty, services=services, faults=faults)
    times = []
    for _ in range(3):
        start = time.thread_time()
        router = Router(snapshot)
        for key in services:
            assert len(router.faults(key, None)) == 1
        times.append(time.thread_time() - start)
    print(f"| {count:,} | {min(times) * 1e3:.1f} ms |")
