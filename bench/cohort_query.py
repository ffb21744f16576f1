#!/usr/bin/env python3
"""Cohort query over three Orthanc partners: meshgate versus a researcher's script.

Synthesises three partners (default 2,000 studies each), loads each into its
own Orthanc with the DICOMweb plugin, starts the release `meshgate serve` in
front of them, and times the demo's cohort question — CT or MR studies of the
chest between 2018 and 2022 — two ways in the same run:

  meshgate   cohortCount, and imagingStudies(first: 20) with FHIR and series;
  baseline   what a researcher would script without meshgate: each partner's
             QIDO-RS in turn (series-level search for the count, then series
             and instances of the 20 newest matching studies).

meshgate runs with its cache off, so every run asks the partners; a second
gateway with the cache on times the same questions asked again (answered
from the cache). With --latency-ms, every partner (for both sides) sits
behind a proxy that delays each direction by half that, as partners reached
over a wide-area network would be.

Prints medians and the ratio meshgate / baseline (lower is better), and checks
both found the same number of studies. Data and Orthanc storage are kept in
--work between runs so only the first run pays for loading.

    cargo build --release -p meshgate-gateway
    python3 bench/cohort_query.py [--studies 2000] [--runs 15] [--latency-ms 20]
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import pathlib
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PARTNERS = [("north", 11), ("south", 22), ("east", 33)]
FILTER = {"modalities": ["CT", "MR"], "bodyPart": "CHEST",
          "studyDate": {"from": "2018-01-01", "to": "2022-12-31"}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url) as r:
        body = r.read()
    return json.loads(body) if body.strip() else []


def start_orthanc(name, storage):
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {"Name": name, "StorageDirectory": str(storage / "db"), "IndexDirectory": str(storage / "db"),
              "HttpPort": port, "DicomServerEnabled": False, "DicomPort": free_port(),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (storage / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(["Orthanc", str(storage / "orthanc.json")],
                            stdout=subprocess.DEVNULL, stderr=open(storage / "orthanc.log", "w"))
    for _ in range(400):
        try:
            get_json(f"http://127.0.0.1:{port}/system")
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"Orthanc {name} did not start")


def load(port, dicom_dir):
    files = sorted(str(p) for p in pathlib.Path(dicom_dir).rglob("*.dcm"))
    chunks = [files[i::8] for i in range(8)]

    def upload(chunk):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for path in chunk:
            with open(path, "rb") as f:
                conn.request("POST", "/instances", body=f.read())
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"upload failed: {r.status}")
        conn.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(upload, chunks))
    return len(files)


def timed(fn, runs):
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), max(times), result


def delay_proxy(upstream_port, one_way):
    """A TCP proxy to 127.0.0.1:upstream_port that delivers every chunk
    `one_way` seconds after it arrived, in each direction (pipelined, like a
    long link). Returns its port."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)

    def pump(src, dst):
        chunks = queue.Queue()

        def deliver():
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=deliver, daemon=True).start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + one_way, data))
            if not data:
                return

    def accept():
        while True:
            client, _ = listener.accept()
            server = socket.create_connection(("127.0.0.1", upstream_port))
            for a, b in ((client, server), (server, client)):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--work", default="/tmp/meshgate-bench")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="round-trip time added between everyone and each partner")
    args = ap.parse_args()
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = target / "release/meshgate"
    if not binary.exists():
        raise SystemExit("build first: cargo build --release -p meshgate-gateway")
    work = pathlib.Path(args.work) / str(args.studies)
    procs, ports = [], {}
    try:
        for name, seed in PARTNERS:
            data = work / name
            if not (data / "manifest.jsonl").exists():
                subprocess.run([binary, "synth", "--partner", name, "--studies", str(args.studies),
                                "--seed", str(seed), "--out", data], check=True, stdout=subprocess.DEVNULL)
            proc, port = start_orthanc(name, work / f"orthanc-{name}")
            procs.append(proc)
            ports[name] = port
            stats = get_json(f"http://127.0.0.1:{port}/statistics")
            if stats["CountStudies"] != args.studies:
                t = time.perf_counter()
                n = load(port, data / "dicom")
                print(f"loaded {n} instances into {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            if args.latency_ms > 0:
                ports[name] = delay_proxy(port, args.latency_ms / 2000.0)

        # A development issuer for the researcher's token, and policies that
        # release identified records, so both sides return the same studies.
        issuer = subprocess.Popen([binary, "dev-issuer", "--claims",
                                   json.dumps({"sub": "bench", "roles": ["researcher"], "projects": ["bench"]})],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(issuer)
        issued = dict(issuer.stdout.readline().strip().split(" ", 1) for _ in range(3))
        token = issued["token"]
        (work / "allow.cedar").write_text(
            'permit (principal, action in Meshgate::Action::"QueryStudies", resource)\n'
            'when { principal.projects.contains(context.project) };\n')
        (work / "pseudonym.key").write_text("bench pseudonymisation key, 32 bytes or more")
        (work / "checkpoint.pem").write_text(
            subprocess.run([binary, "audit", "keygen"], check=True, capture_output=True, text=True).stdout)
        text = ('listen = "127.0.0.1:0"\n\n[auth]\n[[auth.issuers]]\n'
                f'issuer = "{issued["issuer"]}"\naudiences = ["meshgate"]\njwks_url = "{issued["jwks_url"]}"\n\n'
                '[policies]\nconsortium = ["allow.cedar"]\n\n'
                f'[deidentification]\nkey = "${{file:{work / "pseudonym.key"}}}"\n\n'
                f'[audit]\nstore = "sqlite:audit.db"\ncheckpoint_key = "${{file:{work / "checkpoint.pem"}}}"\n\n'
                '[cache]\nttl_seconds = CACHE_TTL\n\n'
                '[[projects]]\nid = "bench"\ntitle = "Benchmark"\npurposes = ["DUO:0000042"]\n')
        for name, _ in PARTNERS:
            text += (f'\n[[partners]]\nid = "{name}"\nname = "{name}"\ndeadline_ms = 30000\nutc_offset = "+01:00"\n'
                     f'institution = "{name}"\ndata_use = {{ permission = "DUO:0000042" }}\npolicies = ["allow.cedar"]\n'
                     f'[partners.connector]\nkind = "dicomweb"\nprofile = "orthanc"\n'
                     f'url = "http://127.0.0.1:{ports[name]}/dicom-web/"\n')
        endpoints = {}
        for mode, ttl in [("uncached", 0), ("cached", 600)]:
            config = work / f"meshgate-{mode}.toml"
            config.write_text(text.replace("CACHE_TTL", str(ttl)).replace("audit.db", f"audit-{mode}.db"))
            gateway = subprocess.Popen([binary, "serve", "--config", config], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)
            procs.append(gateway)
            line = gateway.stdout.readline()
            endpoints[mode] = "http://" + line.split("http://")[1].split()[0]

        def gql(query, mode="uncached"):
            req = urllib.request.Request(endpoints[mode], data=json.dumps({"query": query, "variables": {"f": FILTER}}).encode(),
                                         headers={"content-type": "application/json",
                                                  "authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req) as r:
                body = json.load(r)
            if "errors" in body:
                raise SystemExit(body["errors"])
            return body["data"]

        def meshgate_count(mode="uncached"):
            return gql("query($f: StudyFilter){ cohortCount(project: \"bench\", filter: $f) { total complete } }",
                       mode)["cohortCount"]["total"]

        def meshgate_page(mode="uncached"):
            data = gql("query($f: StudyFilter){ imagingStudies(project: \"bench\", filter: $f, first: 20) "
                       "{ nodes { studyInstanceUid fhir } totalCount } }", mode)["imagingStudies"]
            return data["totalCount"], len(data["nodes"])

        def baseline_matches():
            found = []
            for name, _ in PARTNERS:
                base = f"http://127.0.0.1:{ports[name]}/dicom-web"
                series = get_json(f"{base}/series?BodyPartExamined=CHEST&Modality=CT,MR"
                                  f"&StudyDate=20180101-20221231&includefield=0020000D,00080020,00080030")
                studies = {}
                for s in series:
                    uid = s["0020000D"]["Value"][0]
                    when = s.get("00080020", {}).get("Value", [""])[0] + s.get("00080030", {}).get("Value", [""])[0]
                    studies[uid] = (when, name)
                found += [(when, name, uid) for uid, (when, name) in studies.items()]
            return found

        def baseline_count():
            return len(baseline_matches())

        def baseline_page():
            found = sorted(baseline_matches(), key=lambda x: (-int(x[0][:14] or 0), x[1], x[2]))
            for _, name, uid in found[:20]:
                base = f"http://127.0.0.1:{ports[name]}/dicom-web"
                get_json(f"{base}/studies/{uid}/series")
                get_json(f"{base}/studies/{uid}/instances")
            return len(found), min(20, len(found))

        for mode in endpoints:
            gql("{ partners { id } }", mode)  # warm up connections
        results = {}
        for label, fn in [("count: meshgate", meshgate_count), ("count: baseline", baseline_count),
                          ("count: cached", lambda: meshgate_count("cached")),
                          ("page of 20: meshgate", meshgate_page), ("page of 20: baseline", baseline_page),
                          ("page of 20: cached", lambda: meshgate_page("cached"))]:
            fn()
            results[label] = timed(fn, args.runs)
        mc, bc = results["count: meshgate"][2], results["count: baseline"][2]
        mp, bp = results["page of 20: meshgate"][2], results["page of 20: baseline"][2]
        if mc != bc or mp[0] != bp[0]:
            raise SystemExit(f"answers differ: meshgate {mc}/{mp}, baseline {bc}/{bp}")
        print(f"cohort: CT or MR, CHEST, 2018-2022 over 3 Orthanc partners x {args.studies} studies "
              f"-> {mc} studies; partner RTT +{args.latency_ms:g} ms; {args.runs} runs each, median (max) ms")
        for label, (median, worst, _) in results.items():
            print(f"  {label:<22} {median:8.1f} ({worst:.1f})")
        for what in ["count", "page of 20"]:
            ratio = results[f"{what}: meshgate"][0] / results[f"{what}: baseline"][0]
            cached = results[f"{what}: cached"][0] / results[f"{what}: baseline"][0]
            print(f"  ratio meshgate/baseline, {what}: {ratio:.2f} (cache off), {cached:.3f} (asked again, cached)")
    finally:
        for proc in procs:
            proc.kill()


if __name__ == "__main__":
    main()
