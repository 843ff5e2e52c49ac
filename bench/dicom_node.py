"""Time to result of the DICOM node, beside the direct calls, in ONE run (`make bench-dicom_node`).

Real processes on 127.0.0.1: the classification service (both classifiers), the segmentation service, the
node (`python -m cxr_serving dicom`, STOW-RS of the SR and SEG to Orthanc) and a real Orthanc
(scripts/orthanc.py). Each study is a shared radiograph (`../shared/data/dicom`, in turn) with new
Study/Series/SOP UIDs, sent by C-STORE (pynetdicom); its time to result runs from the C-STORE to its SR
in Orthanc, seen on Orthanc's change feed (a new SR series), polled every --poll-ms.
  direct_c1    each image through cxr_client as the node's worker calls it (classify with every classifier
               beside segment with DICOM SEG), one study at a time: the analysis alone;
  open_loop    one study every 1/--rate s (one association each), bounded by --open-studies and
               --open-seconds: time to result p50/p99 at a steady arrival rate;
  saturation   --rounds rounds, the two paths in turn (the first alternates): N studies C-STOREd back to
               back on one association, as fast as the node accepts them, until the last SR is in Orthanc;
               and the same N images direct through cxr_client at concurrency = the node's workers.
               Time per study = wall / N each; the overhead = node / direct (target <= 1.15).
Every study must finish in the node (GetStudyStatus: done, not dead); `completed` counts them.
--placement split pins (sched_setaffinity, every thread of every process of each tree) the model services on
--model-cpus and the node, Orthanc and this process (the direct client too) on --node-cpus, as the chart puts
the node on a CPU pool apart from the models' pools; `shared` (the default) pins nothing.

    .venv/bin/python -m bench.dicom_node            # classifiers @224, U-Net resnet34 @256, ~6 min on 2 cores
    .venv/bin/python -m bench.dicom_node --quick    # 64 px models, a few studies (the smoke test's size)
    .venv/bin/python -m bench.dicom_node --placement split   # models on one half of the CPUs, the rest on the other
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from bench._common import (
    API_KEY,
    RESULTS,
    SHARED,
    ServerProcess,
    free_port,
    grpc_serving,
    machine,
    percentile,
    stage,
    stop_on_sigterm,
    tree_cpu_s,
    write_result,
)
from bench._peers import StackOptions, default_model_instances, server_section
from bench._placement import MODES, Placement, PlacementError, parse_cpus, pin_process, pin_tree, plan, read_back
from tests.support.scripts import load_script

DICOM_DIR = SHARED / "data" / "dicom"
NODE_AE = "CXR"
CALLING_AE = "BENCH_SCU"
OVERHEAD_TARGET = 1.15
MODEL_SERVICES = ("classification", "segmentation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 px models, few studies (a smoke run)")
    ap.add_argument("--input-size", type=int, help="classifiers' input (224; quick 64)")
    ap.add_argument("--seg-input-size", type=int, help="segmentation input (256; quick 64)")
    ap.add_argument("--encoder", help="segmentation encoder (resnet34; quick resnet18)")
    ap.add_argument("--workers", type=int, default=2, help="the node's models.dicom.workers")
    ap.add_argument("--direct-studies", type=int, help="direct_c1 studies (20; quick 3)")
    ap.add_argument("--rate", type=float, default=1.0, help="open_loop arrival rate, studies/s")
    ap.add_argument("--open-studies", type=int, help="open_loop studies at most (40; quick 3)")
    ap.add_argument("--open-seconds", type=float, default=60.0, help="open_loop sending time at most")
    ap.add_argument("--studies", type=int, help="studies per saturation batch (30; quick 4)")
    ap.add_argument("--rounds", type=int, help="saturation rounds (2; quick 1)")
    ap.add_argument("--result-timeout", type=float, default=600.0, help="longest wait for a batch's last SR")
    ap.add_argument("--poll-ms", type=float, default=50.0, help="Orthanc change feed polling interval")
    ap.add_argument(
        "--placement",
        choices=MODES,
        default="shared",
        help="shared: no pinning; split: the models "
        "on --model-cpus, the node, Orthanc and this process on --node-cpus (needs 2 CPUs or more)",
    )
    ap.add_argument("--model-cpus", type=parse_cpus, help="split: the models' CPUs (default: the first half)")
    ap.add_argument("--node-cpus", type=parse_cpus, help="split: the rest's CPUs (default: the CPUs left)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    try:
        args.cpu_placement = plan(args.placement, model_cpus=args.model_cpus, node_cpus=args.node_cpus)
    except PlacementError as e:
        ap.error(str(e))
    q = args.quick
    args.input_size = args.input_size or (64 if q else 224)
    args.seg_input_size = args.seg_input_size or (64 if q else 256)
    args.encoder = args.encoder or ("resnet18" if q else "resnet34")
    args.direct_studies = args.direct_studies or (3 if q else 20)
    args.open_studies = args.open_studies or (3 if q else 40)
    args.studies = args.studies or (4 if q else 30)
    args.rounds = args.rounds or (1 if q else 2)
    return args


# -- the stack -----------------------------------------------------------------------------------
def model_instances(placement: Placement) -> int:
    """One forward per core the models have: every core (shared), or the models' set (split)."""
    return len(placement.model_cpus) if placement.mode == "split" else default_model_instances("cpu", 1)


def settings_json(args: argparse.Namespace, tmp: Path, ports: dict[str, int], stow_url: str) -> dict[str, Any]:
    """One settings file for the three services: both classifiers, the U-Net, the node."""
    opts = StackOptions(
        input_size=args.input_size,
        seg_input_size=args.seg_input_size,
        encoder=args.encoder,
        model_instances=model_instances(args.cpu_placement),
    )
    base = server_section(opts)
    base["server_config"]["log_level"] = "INFO"
    models = {
        "binary_classifier": {"model_type": "swin_transformer", "allow_untrained": True, "input_size": args.input_size},
        "multiclass_classifier": {"model_type": "densenet121", "allow_untrained": True, "input_size": args.input_size},
        "segmentation": {
            "enabled": True, "allow_untrained": True, "input_size": args.seg_input_size, "encoder": args.encoder,
        },
        "dicom": {
            "ae_title": NODE_AE,
            "dimse_port": ports["dimse"],
            "stow_port": ports["stow"],
            "data_path": str(tmp / "node"),
            "workers": args.workers,
            "retry_backoff_initial_s": 1,
            "retry_backoff_max_s": 5,
            "analysis": {
                "classification_endpoint": f"127.0.0.1:{ports['classification']}",
                "segmentation_endpoint": f"127.0.0.1:{ports['segmentation']}",
                "api_key": API_KEY,
                "timeout_s": 300,
            },
            "destinations": {"stow_url": stow_url, "fhir_folder": str(tmp / "fhir"), "timeout_s": 120},
        },
    }  # fmt: skip
    services = {
        n: {"host": "127.0.0.1", "port": ports[n], "metrics_port": 0} for n in ("classification", "segmentation")
    }
    services["dicom"] = {"host": "127.0.0.1", "port": ports["dicom"], "metrics_port": 0}
    return {**base, "models": models, "services": services}


def service(name: str, config: Path, port: int, placement: Placement) -> ServerProcess:
    cmd = [
        sys.executable,
        "-m",
        "cxr_serving",
        name,
        "--config",
        str(config),
        "--port",
        str(port),
        "--metrics-port",
        "0",
    ]
    server = ServerProcess(cmd, name=name).start()
    if placement.mode == "split" and server.proc is not None:
        pin_tree(server.proc.pid, cpus_of(name, placement))
    return server


def cpus_of(name: str, placement: Placement) -> frozenset[int]:
    return placement.model_cpus if name in MODEL_SERVICES else placement.node_cpus


def apply_placement(placement: Placement, procs: dict[str, int]) -> None:
    """Pin each tree (and this process, whose threads the direct client and the C-STORE sender run on) again
    once everything is started: threads and children made since inherit, this catches any made before."""
    if placement.mode != "split":
        return
    pin_process(os.getpid(), placement.node_cpus)
    for name, pid in procs.items():
        pin_tree(pid, cpus_of(name, placement))


def placement_read_back(placement: Placement, procs: dict[str, int]) -> dict[str, Any]:
    """sched_getaffinity of every process of every tree and of this process's threads, against its set."""
    out = {name: read_back(pid, cpus_of(name, placement)) for name, pid in procs.items()}
    out["bench"] = read_back(os.getpid(), placement.node_cpus, tree=False)
    return out


# -- studies -------------------------------------------------------------------------------------
class Studies:
    """The shared radiographs; `new(i)` is the i-th (in turn) as a new study (new Study/Series/SOP UIDs)."""

    def __init__(self) -> None:
        self.files = sorted(DICOM_DIR.glob("*.dcm"))
        if not self.files:
            raise SystemExit(f"no DICOM files under {DICOM_DIR} (set CXR_SHARED_DIR)")
        self.raw = [p.read_bytes() for p in self.files]
        headers = [pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True) for b in self.raw]
        self.contexts = sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers})

    def new(self, i: int) -> pydicom.Dataset:
        ds = pydicom.dcmread(io.BytesIO(self.raw[i % len(self.raw)]))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    def image(self, i: int) -> Any:
        from cxr_protos.common.v1 import common_pb2

        return common_pb2.Image(data=self.raw[i % len(self.raw)], content_type="application/dicom")


def c_store(
    port: int, contexts: list[tuple[str, str]], datasets: list[pydicom.Dataset], sent: dict[str, float]
) -> None:
    """Send `datasets` back to back on one association; `sent[study]` is when each send began."""
    from pynetdicom import AE

    ae = AE(ae_title=CALLING_AE)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    try:
        for ds in datasets:
            sent[str(ds.StudyInstanceUID)] = time.perf_counter()
            status = assoc.send_c_store(ds)
            if int(getattr(status, "Status", -1)) != 0:
                raise RuntimeError(f"C-STORE status {status}")
    finally:
        assoc.release()


class SrWatch:
    """Polls Orthanc's change feed; `seen[study]` is when the first SR series of that study was there."""

    def __init__(self, url: str, poll_s: float) -> None:
        self.url = url
        self.poll_s = poll_s
        self.seen: dict[str, float] = {}
        self._since = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SrWatch:
        import httpx

        self._http = httpx.AsyncClient(base_url=self.url, timeout=30)
        self._since = int((await self._http.get("/changes", params={"last": ""})).json()["Last"])
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._http.aclose()

    async def _run(self) -> None:
        while True:
            now = time.perf_counter()
            answer = (await self._http.get("/changes", params={"since": self._since, "limit": 1000})).json()
            for change in answer["Changes"]:
                if change["ChangeType"] == "NewSeries":
                    series = (await self._http.get(f"/series/{change['ID']}")).json()
                    if series["MainDicomTags"].get("Modality") == "SR":
                        study = (await self._http.get(f"/studies/{series['ParentStudy']}")).json()
                        self.seen.setdefault(study["MainDicomTags"]["StudyInstanceUID"], now)
            self._since = int(answer["Last"])
            if answer["Done"]:
                await asyncio.sleep(self.poll_s)

    async def wait(self, studies: list[str], timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if all(s in self.seen for s in studies):
                return True
            assert self._task is not None
            if self._task.done():
                self._task.result()  # the poller's error
            await asyncio.sleep(self.poll_s)
        return False


async def completed(node_port: int, studies: list[str], settle_s: float = 60.0) -> int:
    """Studies the node reports finished with every instance done and none dead. A study's SR reaches Orthanc
    before the node has written its FHIR bundle and completed it, so an unfinished study is asked again, for at
    most ``settle_s``."""
    import grpc

    from cxr_protos.dicom.v1 import dicom_service_pb2 as pb
    from cxr_protos.dicom.v1 import dicom_service_pb2_grpc as pb_grpc

    n = 0
    deadline = time.perf_counter() + settle_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node_port}") as ch:
        stub = pb_grpc.DicomServiceStub(ch)
        for s in studies:
            while True:
                r = await stub.GetStudyStatus(
                    pb.GetStudyStatusRequest(study_instance_uid=s), metadata=(("x-api-key", API_KEY),), timeout=30
                )
                if r.finished or time.perf_counter() > deadline:
                    break
                await asyncio.sleep(0.1)
            n += int(r.finished and r.done >= 1 and r.dead == 0)
    return n


# -- phases --------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, studies: Studies, client: Any, watch: SrWatch, ports: dict[str, int]):
        self.args = args
        self.studies = studies
        self.client = client
        self.watch = watch
        self.ports = ports
        self.next = 0

    async def analyse(self, i: int) -> None:
        """What the node's worker asks of the services for one image (cxr_dicom.worker.Worker.process)."""
        image = self.studies.image(i)
        await asyncio.gather(
            self.client.classify(image, model_names=[]),
            self.client.segment(image, mask_encoding="none", include_dicom_seg=True),
        )

    def batch(self, n: int) -> list[pydicom.Dataset]:
        out = [self.studies.new(self.next + k) for k in range(n)]
        self.next += n
        return out

    async def direct(self, n: int, concurrency: int) -> dict[str, Any]:
        lat: list[float] = []
        todo = iter(range(n))
        deadline = time.perf_counter() + self.args.result_timeout

        async def caller() -> None:
            for i in todo:
                if time.perf_counter() > deadline:
                    return
                t = time.perf_counter()
                await self.analyse(i)
                lat.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        return {
            "studies": len(lat),
            "concurrency": concurrency,
            "seconds": round(wall, 3),
            "s_per_study": round(wall / max(1, len(lat)), 4),
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
        }

    async def node_results(self, datasets: list[pydicom.Dataset], sent: dict[str, float]) -> dict[str, Any]:
        uids = [str(ds.StudyInstanceUID) for ds in datasets]
        all_in = await self.watch.wait(uids, self.args.result_timeout)
        ttr = [(self.watch.seen[u] - sent[u]) * 1000 for u in uids if u in self.watch.seen and u in sent]
        done = await completed(self.ports["dicom"], uids)
        seen = [self.watch.seen[u] for u in uids if u in self.watch.seen]
        first = min(sent.values()) if sent else 0.0
        wall = (max(seen) - first) if seen else 0.0
        return {
            "studies": len(datasets),
            "sr_in_orthanc": len(ttr),
            "completed": done,
            "all_in_time": all_in,
            "seconds": round(wall, 3),
            "s_per_study": round(wall / max(1, len(ttr)), 4),
            "ttr_p50_ms": percentile(ttr, 50),
            "ttr_p99_ms": percentile(ttr, 99),
        }

    async def node_batch(self, n: int) -> dict[str, Any]:
        """N studies on one association as fast as the node accepts them, until the last SR is in Orthanc."""
        datasets, sent = self.batch(n), {}
        t0 = time.perf_counter()
        await asyncio.to_thread(c_store, self.ports["dimse"], self.studies.contexts, datasets, sent)
        accept_s = time.perf_counter() - t0
        result = await self.node_results(datasets, sent)
        result["accept_seconds"] = round(accept_s, 3)
        return result

    async def node_open_loop(self) -> dict[str, Any]:
        a = self.args
        n = max(1, min(a.open_studies, int(a.rate * a.open_seconds)))
        datasets, sent = self.batch(n), {}
        started = time.perf_counter()
        sends = []
        for i, ds in enumerate(datasets):
            delay = started + i / a.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sends.append(
                asyncio.ensure_future(
                    asyncio.to_thread(c_store, self.ports["dimse"], self.studies.contexts, [ds], sent)
                )
            )
        await asyncio.gather(*sends)
        span = max(sent.values()) - min(sent.values()) if len(sent) > 1 else 0.0
        result = await self.node_results(datasets, sent)
        return {"rate_per_s": a.rate, "achieved_send_per_s": round((n - 1) / span, 3) if span else None, **result}


def cpu_of(procs: dict[str, int]) -> dict[str, float]:
    return {name: tree_cpu_s([pid]) for name, pid in procs.items()}


def cpu_per_study(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {name: round((after[name] - before[name]) / max(1, n), 4) for name in before}


async def measure(args: argparse.Namespace, bench: Bench, procs: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with stage("warm-up: 2 studies each way"):
        await bench.direct(2, 1)
        await bench.node_batch(2)
    with stage(f"direct_c1: {args.direct_studies} studies through cxr_client, one at a time"):
        out["direct_c1"] = await bench.direct(args.direct_studies, 1)
        print("  ", out["direct_c1"], flush=True)
    with stage(f"open_loop: {args.rate}/s, at most {args.open_studies} studies / {args.open_seconds} s"):
        out["open_loop"] = await bench.node_open_loop()
        print("  ", out["open_loop"], flush=True)
    rounds = []
    for r in range(args.rounds):
        order = ["direct", "node"] if r % 2 == 0 else ["node", "direct"]
        cell: dict[str, Any] = {"order": order, "load_average_1m": round(os.getloadavg()[0], 2)}
        for path in order:
            with stage(f"saturation round {r + 1}: {path}, {args.studies} studies"):
                before = cpu_of(procs)
                if path == "node":
                    cell["node"] = await bench.node_batch(args.studies)
                else:
                    cell["direct"] = await bench.direct(args.studies, args.workers)
                cell[path]["cpu_s_per_study"] = cpu_per_study(before, cpu_of(procs), args.studies)
                print("  ", cell[path], flush=True)
        cell["overhead"] = round(cell["node"]["s_per_study"] / cell["direct"]["s_per_study"], 3)
        rounds.append(cell)
    node_s = sum(c["node"]["seconds"] for c in rounds) / max(1, sum(c["node"]["sr_in_orthanc"] for c in rounds))
    direct_s = sum(c["direct"]["seconds"] for c in rounds) / max(1, sum(c["direct"]["studies"] for c in rounds))
    overhead = round(node_s / direct_s, 3)
    out["saturation"] = {
        "rounds": rounds,
        "node_s_per_study": round(node_s, 4),
        "direct_s_per_study": round(direct_s, 4),
        "overhead": overhead,
        "overhead_by_round": [c["overhead"] for c in rounds],
        "target": OVERHEAD_TARGET,
        "within_target": overhead <= OVERHEAD_TARGET,
    }
    phases = [out["open_loop"], *(c["node"] for c in rounds)]
    out["all_completed"] = all(p["completed"] == p["studies"] == p["sr_in_orthanc"] for p in phases)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from cxr_client import AsyncCxrClient, ClientConfig

    orthanc_script = load_script("orthanc")
    missing = orthanc_script.missing()
    if missing:
        raise SystemExit(f"bench.dicom_node needs {', '.join(missing)} (make dicom-tools)")
    studies = Studies()
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as tmp_name:
        tmp = Path(tmp_name)
        with orthanc_script.run_orthanc(tmp / "orthanc") as orthanc:
            ports = {k: free_port() for k in ("classification", "segmentation", "dicom", "dimse", "stow")}
            config = tmp / "settings.json"
            config.write_text(json.dumps(settings_json(args, tmp, ports, orthanc.dicomweb_url), indent=1))
            startup: dict[str, float] = {}
            try:
                with stage("start: classification, segmentation, the node"):
                    for name in ("classification", "segmentation", "dicom"):
                        servers.append(service(name, config, ports[name], args.cpu_placement))
                    for s in servers:
                        startup[s.name] = await s.wait_ready(lambda s=s: grpc_serving(ports[s.name]), timeout=600)
                procs = {s.name: s.proc.pid for s in servers if s.proc is not None}
                procs["orthanc"] = orthanc.process.pid
                apply_placement(args.cpu_placement, procs)
                placement = {**args.cpu_placement.as_json(), "applied": placement_read_back(args.cpu_placement, procs)}
                endpoints = {n: f"127.0.0.1:{ports[n]}" for n in ("classification", "segmentation")}
                cfg = ClientConfig(endpoints=endpoints, api_key=API_KEY, timeout_s=300)
                load_before = round(os.getloadavg()[0], 2)
                async with AsyncCxrClient(cfg) as client, SrWatch(orthanc.url, args.poll_ms / 1000) as watch:
                    bench = Bench(args, studies, client, watch, ports)
                    result = await measure(args, bench, procs)
                placement["at_end"] = placement_read_back(args.cpu_placement, procs)
                placement["held"] = all(r["held"] for k in ("applied", "at_end") for r in placement[k].values())
                result["placement"] = placement
                result["startup_s"] = startup
                result["load_average_1m"] = {"start": load_before, "end": round(os.getloadavg()[0], 2)}
                return result
            except BaseException:
                for s in servers:
                    print(f"--- {s.name} log tail:\n{s.log_tail(1500)}", flush=True)
                raise
            finally:
                for s in reversed(servers):  # the node first, while Orthanc still runs
                    s.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    if args.cpu_placement.mode == "split":
        pin_process(os.getpid(), args.cpu_placement.node_cpus)  # Orthanc and the services start from this set
    result = asyncio.run(run(args))
    config = {
        k: getattr(args, k)
        for k in ("quick", "input_size", "seg_input_size", "encoder", "workers", "direct_studies", "rate",
                  "open_studies", "open_seconds", "studies", "rounds", "poll_ms", "placement")
    }  # fmt: skip
    config["model_instances"] = model_instances(args.cpu_placement)
    config["images"] = [p.name for p in sorted(DICOM_DIR.glob("*.dcm"))]
    out = args.out or (None if not args.quick else RESULTS / "dicom_node-quick.json")
    write_result("dicom_node", {"machine": machine(), "config": config, **result}, out)
    s = result["saturation"]
    print(
        f"time to result at {args.rate}/s: p50 {result['open_loop']['ttr_p50_ms']} ms, p99 "
        f"{result['open_loop']['ttr_p99_ms']} ms; saturation per study: node {s['node_s_per_study']} s, direct "
        f"{s['direct_s_per_study']} s, overhead {s['overhead']} (target <= {OVERHEAD_TARGET}); placement "
        f"{args.placement}, held: {result['placement']['held']}",
        flush=True,
    )
    return 0 if result["all_completed"] and result["placement"]["held"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
