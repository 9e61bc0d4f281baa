"""A sweep through a cuttable TCP proxy to the local PostgreSQL; the database is cut for 65 s
once 3 units are done. Prints what the driver said and checks the exact result set.

    python bench/outage.py        (needs PostgreSQL on 127.0.0.1:5432; about 2-3 minutes)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy.engine import make_url  # noqa: E402

from db.store import connect  # noqa: E402
from orchestrator.planner import plan  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from tests.fixtures_db import postgres_schema_url  # noqa: E402
from tests.orch_helpers import (  # noqa: E402
    FAULT_SITE,
    ROOT,
    UNIT_DELAY_ENV,
    check_complete,
    cli,
    spec_dict,
    units,
    wait_for,
    write_spec,
)
from tests.tcp_proxy import TcpProxy  # noqa: E402

CUT_S = 65.0


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="unisweep-outage-"))
    with postgres_schema_url() as url, TcpProxy(make_url(url).port or 5432) as proxy:
        via = make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        spec = write_spec(tmp / "s.yaml", spec_dict("outage65", tmp / "out",
                                                     resources={"cpus_per_actor": 1}))
        t0 = time.monotonic()
        # tests/fault_site makes each unit sleep 0.5 s, so the cut lands mid-sweep.
        p = cli("run", str(spec), "--db", via, "--no-progress", "--actors", "1",
                env={UNIT_DELAY_ENV: "0.5", "PYTHONPATH": os.pathsep.join(
                    (str(FAULT_SITE), str(ROOT), os.environ.get("PYTHONPATH", "")))})
        store = connect(url)

        def three_done() -> bool:
            return bool(store.list_sweeps()) and sum(
                r["status"] == "done" for r in units(store, "outage65")) >= 3

        print("3 units done:", wait_for(three_done, 300), f"at {time.monotonic() - t0:.1f} s", flush=True)
        proxy.cut()
        t_cut = time.monotonic()
        time.sleep(CUT_S)
        proxy.restore()
        print(f"database back after {time.monotonic() - t_cut:.1f} s", flush=True)
        out, _ = p.communicate(timeout=600)
        print("driver exit", p.returncode, "with" if "Traceback" in out else "without", "a traceback")
        print(out[-800:])
        got = check_complete(store, "outage65", {u.key for u in plan(load_spec(spec)).units})
        print("complete:", json.dumps(got))
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
