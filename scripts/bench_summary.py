"""Print a markdown table from a pytest-benchmark JSON: median time and, where a benchmark recorded it in
`extra_info` ("bytes", ...), the achieved bandwidth. The JSON is rewritten in place without the per-round
`stats.data` arrays (a GPU run of µs-scale kernels records ~1e5 rounds each: tens of MB that the device tool would
not bring back); every summary statistic stays."""
import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    for b in data["benchmarks"]:
        b["stats"].pop("data", None)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print("\n| benchmark | median (ms) | GB/s | notes |\n|---|---|---|---|")
    for b in data["benchmarks"]:
        med = b["stats"]["median"]
        extra = b.get("extra_info", {})
        gbps = f"{extra['bytes'] / med / 1e9:.1f}" if "bytes" in extra else ""
        notes = ", ".join(f"{k}={v}" for k, v in extra.items() if k != "bytes")
        print(f"| {b['fullname'].split('::')[-1]} | {med * 1e3:.4f} | {gbps} | {notes} |")


if __name__ == "__main__":
    main(sys.argv[1])
