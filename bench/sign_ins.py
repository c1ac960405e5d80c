"""What guessing costs the server: memory kept for long user names, and hashes run for guesses sent at once.

The real server (the Procfile's command, as bench/harness.py starts it), private: `--names`
wrong sign-ins with user names of `--name-kib` KiB, each from its own address (loopback is a
trusted proxy, so X-Forwarded-For names it), then how much the server's memory grew; then
`--at-once` wrong passwords from one address in as many threads, how many were hashed (401)
and refused (429), and how long the right password then took from another address.

    .venv/bin/python -m bench.sign_ins                          # this tree
    .venv/bin/python -m bench.sign_ins --server-dir /tmp/before # an older checkout's server
"""
import argparse
import tempfile
import threading
import time

import requests

from bench.harness import ROOT, free_port, server_memory_mib, start_ours

PASSWORD = "bench-admin-password-1"


def sign_in(url, user, password, address):
    return requests.post(url + "/login", data={"user": user, "password": password}, timeout=60,
                         headers={"X-Forwarded-For": address}).status_code


def run(url, pid, names, name_kib, at_once):
    """Measure and print both figures against the server at `url` (its process `pid`)."""
    before, codes = server_memory_mib(pid), {}
    with requests.Session() as session:
        for n in range(names):
            code = session.post(url + "/login", data={"user": f"{n}" + "x" * (name_kib << 10),
                                                      "password": "wrong-password-1"}, timeout=60,
                                headers={"X-Forwarded-For": f"10.1.{n >> 8}.{n & 255}"}).status_code
            codes[code] = codes.get(code, 0) + 1
    time.sleep(1)
    print(f"{names} wrong sign-ins with {name_kib} KiB names: answers {codes}; the server grew "
          f"{server_memory_mib(pid) - before:.1f} MiB")
    answers, start = [], threading.Event()

    def guess(n):
        start.wait()
        answers.append(sign_in(url, "admin", f"guess-{n:05d}-xx", "198.51.100.50"))
    threads = [threading.Thread(target=guess, args=(n,)) for n in range(at_once)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    start.set()
    for thread in threads:
        thread.join()
    took_all = time.monotonic() - began
    began = time.monotonic()
    right = sign_in(url, "admin", PASSWORD, "203.0.113.9")
    print(f"{at_once} wrong passwords at once from one address: {answers.count(401)} hashed (401), "
          f"{answers.count(429)} refused (429) in {took_all * 1000:.0f} ms; then the right one from another "
          f"address: {right} in {(time.monotonic() - began) * 1000:.0f} ms")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=300)
    parser.add_argument("--name-kib", type=int, default=450)
    parser.add_argument("--at-once", type=int, default=100)
    parser.add_argument("--server-dir", default=str(ROOT), help="the checkout whose server is measured")
    args = parser.parse_args(argv)
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", prefix="bench-sign-ins-", suffix=".log") as log:
        server = start_ours(port, ["k" * 24], log, server_dir=args.server_dir, ADMIN_PASSWORD=PASSWORD,
                            DASHBOARD_PUBLIC="0")
        try:
            run(f"http://127.0.0.1:{port}", server.pid, args.names, args.name_kib, args.at_once)
        finally:
            server.terminate()
            server.wait(15)


if __name__ == "__main__":
    main()
