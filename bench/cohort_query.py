#!/usr/bin/env python3
"""Cohort queries over three Orthanc partners: meshgate versus a researcher's script.

Synthesises three partners (default 2,000 studies each), loads each into its
own Orthanc with the DICOMweb plugin, starts the release `meshgate serve` in
front of them, and times, interleaved in the same run:

  counts     all studies; CT; MR 2018-2022; CT of the chest; women aged
             50-70; one study by UID. meshgate's cohortCount against the best
             sequential script for each: one QIDO-RS search per partner in
             turn, at study level (ModalitiesInStudy, StudyDate, PatientSex,
             StudyInstanceUID) or, for body part, at series level; and the
             UID lookup against one direct call to the partner holding it.
  page       imagingStudies(first: 500) with FHIR series and instances,
             against a script that lists the studies and fetches their series
             and instances with UID-list queries (50 UIDs each).

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
                f'issuer = "{issued["issuer"]}"\naudiences = ["meshgate"]\njwks_url = "{issued["jwks_url"]}"\n'
                'trusted_for = { roles = ["*"], projects = ["*"] }\n\n'
                '[policies]\nconsortium = ["allow.cedar"]\n\n'
                f'[deidentification]\nkey = "${{file:{work / "pseudonym.key"}}}"\n\n'
                f'[audit]\nstore = "sqlite:audit.db"\ncheckpoint_key = "${{file:{work / "checkpoint.pem"}}}"\n\n'
                '[cache]\nttl_seconds = CACHE_TTL\n\n'
                # One benchmark principal asks back to back: no rate limit.
                '[server]\nper_principal = { concurrent = 64, per_second = 100000.0, burst = 100000 }\n'
                'per_address = { concurrent = 256, per_second = 100000.0, burst = 100000 }\n\n'
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

        def gql(query, mode="uncached", flt=None):
            req = urllib.request.Request(endpoints[mode],
                                         data=json.dumps({"query": query, "variables": {"f": flt or {}}}).encode(),
                                         headers={"content-type": "application/json",
                                                  "authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req) as r:
                body = json.load(r)
            if "errors" in body:
                raise SystemExit(body["errors"])
            return body["data"]

        def meshgate_count(flt, mode="uncached"):
            data = gql("query($f: StudyFilter){ cohortCount(project: \"bench\", filter: $f) { total complete } }",
                       mode, flt)["cohortCount"]
            if not data["complete"]:
                raise SystemExit(f"incomplete count for {flt}")
            return data["total"]

        def qido(name, path):
            return get_json(f"http://127.0.0.1:{ports[name]}/dicom-web/{path}")

        def text(row, tag):
            return row.get(tag, {}).get("Value", [""])[0]

        def age(row):
            born, on = text(row, "00100030"), text(row, "00080020")
            if len(born) != 8 or len(on) != 8:
                return None
            years = int(on[:4]) - int(born[:4])
            return years - 1 if on[4:] < born[4:] else years

        # The best sequential script for each cohort: one QIDO-RS search per
        # partner, in turn, at the level that answers it.
        def studies_where(query, keep=lambda row: True):
            def run():
                found = set()
                for name, _ in PARTNERS:
                    found |= {(name, text(r, "0020000D")) for r in qido(name, f"studies?{query}") if keep(r)}
                return len(found)
            return run

        def series_where(query):
            def run():
                found = set()
                for name, _ in PARTNERS:
                    found |= {(name, text(r, "0020000D"))
                              for r in qido(name, f"series?{query}&includefield=0020000D")}
                return len(found)
            return run

        one_uid = text(qido("south", "studies?limit=1&offset=7")[0], "0020000D")
        cohorts = [
            ("all", {}, studies_where("includefield=00080020")),
            ("CT", {"modalities": ["CT"]}, studies_where("ModalitiesInStudy=CT")),
            ("MR 2018-2022", {"modalities": ["MR"], "studyDate": {"from": "2018-01-01", "to": "2022-12-31"}},
             studies_where("ModalitiesInStudy=MR&StudyDate=20180101-20221231")),
            ("CT chest", {"modalities": ["CT"], "bodyPart": "CHEST"},
             series_where("Modality=CT&BodyPartExamined=CHEST")),
            ("women 50-70", {"patientSex": "FEMALE", "patientAge": {"min": 50, "max": 70}},
             studies_where("PatientSex=F&includefield=00100030,00080020",
                           lambda r: (a := age(r)) is not None and 50 <= a <= 70)),
            ("one UID", {"studyInstanceUids": [one_uid]}, studies_where(f"StudyInstanceUID={one_uid}")),
        ]

        # A page of 500 with series and instances: meshgate, and a script
        # that lists the studies and fetches their series and instances
        # with UID-list queries (50 UIDs each), partner by partner.
        def meshgate_page(mode="uncached"):
            data = gql("query($f: StudyFilter){ imagingStudies(project: \"bench\", filter: $f, first: 500) "
                       "{ nodes { studyInstanceUid fhir } partners { status } } }", mode, {})["imagingStudies"]
            if any(p["status"] != "OK" for p in data["partners"]):
                raise SystemExit(f"page of 500: {data['partners']}")
            return sum(len(n["fhir"].get("series", [])) for n in data["nodes"])

        def baseline_page():
            found = []
            for name, _ in PARTNERS:
                for r in qido(name, "studies?includefield=00080020,00080030"):
                    found.append((text(r, "00080020") + text(r, "00080030"), name, text(r, "0020000D")))
            found.sort(key=lambda x: (-int(x[0][:14] or 0), x[1], x[2]))
            series = 0
            for name, _ in PARTNERS:
                uids = [uid for _, n, uid in found[:500] if n == name]
                for i in range(0, len(uids), 50):
                    chunk = ",".join(uids[i:i + 50])
                    series += len(qido(name, f"series?StudyInstanceUID={chunk}"))
                    qido(name, f"instances?StudyInstanceUID={chunk}&includefield=0020000E")
            return series

        for mode in endpoints:
            gql("{ partners { id } }", mode)  # warm up connections
        print(f"3 Orthanc partners x {args.studies} studies; partner RTT +{args.latency_ms:g} ms; "
              f"{args.runs} runs each, interleaved; median ms (ratio meshgate/script, lower is better)")
        for label, flt, script in cohorts:
            mesh, base = [], []
            for _ in range(args.runs):
                t = time.perf_counter(); mc = meshgate_count(flt); mesh.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter(); bc = script(); base.append((time.perf_counter() - t) * 1000)
                if mc != bc:
                    raise SystemExit(f"{label}: meshgate counted {mc}, the script {bc}")
            m, b = statistics.median(mesh), statistics.median(base)
            cached = timed(lambda: meshgate_count(flt, "cached"), args.runs)[0]
            print(f"  count {label:<14} {mc:5d} studies: meshgate {m:7.1f}  script {b:7.1f}  ratio {m / b:.2f}"
                  f"  (cached {cached:.1f})")
        # The UID lookup against one direct QIDO-RS call to the partner that
        # holds the study (which meshgate does not know, so it asks all).
        # The floor for asking every partner: the same call to all three at
        # once, which on a machine with fewer cores than partners is not free.
        mesh, direct, fanned = [], [], []
        with concurrent.futures.ThreadPoolExecutor(len(PARTNERS)) as pool:
            for _ in range(args.runs):
                t = time.perf_counter(); meshgate_count({"studyInstanceUids": [one_uid]})
                mesh.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter(); qido("south", f"studies?StudyInstanceUID={one_uid}")
                direct.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                list(pool.map(lambda p: qido(p[0], f"studies?StudyInstanceUID={one_uid}"), PARTNERS))
                fanned.append((time.perf_counter() - t) * 1000)
        m, d, f = statistics.median(mesh), statistics.median(direct), statistics.median(fanned)
        print(f"  one UID against one direct QIDO call: meshgate {m:7.1f}  direct {d:7.1f}  ratio {m / d:.2f}"
              f"  (the same call to all {len(PARTNERS)} partners at once: {f:.1f}, ratio {f / d:.2f})")
        mesh, base = [], []
        for _ in range(max(3, args.runs // 3)):
            t = time.perf_counter(); ms = meshgate_page(); mesh.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter(); bs = baseline_page(); base.append((time.perf_counter() - t) * 1000)
            if ms != bs:
                raise SystemExit(f"page of 500: meshgate {ms} series, the script {bs}")
        m, b = statistics.median(mesh), statistics.median(base)
        print(f"  page of 500 with series and instances ({ms} series): meshgate {m:7.1f}  script {b:7.1f}"
              f"  ratio {m / b:.2f}")
    finally:
        for proc in procs:
            proc.kill()


if __name__ == "__main__":
    main()
