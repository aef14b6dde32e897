"""Measure the trust features through the running service: interval coverage, false calls, refusals.

    python -m bench.trust [--model models/boneage.onnx] [--out docs/trust]

Starts the real service (uvicorn) on the model, set to *warn* so that every image gets an
answer and the gate's verdict comes back as ``warnings`` (the same decision that, by
default, refuses with 422), and posts:

- the 300 half-resolution RSNA radiographs, each with its true bone age given as the
  child's age: a perfect reader calls every one *normal*, so any *delayed* or *advanced*
  is a false call. Counted under the plain ±2 SD rule on the point estimate (what the
  service answered before) and under the interval rule; interval coverage by age band;
- the 21 full-resolution RSNA radiographs, the 16 hospital JPEGs, the 10 infant PNGs and
  the real DICOM: real hands that should pass;
- the negatives of :mod:`bench.negatives`: everything that should be refused.

Writes ``trust.json`` and ``trust.md`` (tables for docs/ and the model card).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.negatives import made_from_hands, packaged
from bench.server import running
from training.data import data_root
from training.evaluate import AGE_BANDS

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "boneage.onnx"


def ask(client: httpx.Client, name: str, data: bytes, fields: dict) -> dict:
    response = client.post("/v1/bone-age", files={"image": (name, data)}, data=fields)
    body = response.json()
    refused = response.status_code != 200 or bool(body.get("warnings"))
    reason = (
        "; ".join(body["warnings"])[:90]
        if response.status_code == 200
        else f"{response.status_code} {body.get('title', '')}"
    )
    return {"name": name, "status": response.status_code, "refused": refused, "reason": reason if refused else ""}


def labelled(client: httpx.Client, folder: Path) -> list[dict]:
    """Each radiograph with its true bone age as the child's age (a perfect reader calls all normal)."""
    rows = []
    for row in csv.DictReader((folder / "labels.csv").open()):
        true = float(row["boneage"])
        fields = {"sex": "male" if row["male"] == "True" else "female", "chronological_age_months": f"{true:g}"}
        path = folder / "images" / f"{row['id']}.png"
        response = client.post("/v1/bone-age", files={"image": (path.name, path.read_bytes())}, data=fields)
        if response.status_code != 200:
            rows.append({"id": row["id"], "true": true, "status": response.status_code, "refused": True})
            continue
        body = response.json()
        a, interval = body["assessment"], body["bone_age_interval_months"]
        z = a["z_score"]
        rows.append(
            {
                "id": row["id"],
                "true": true,
                "status": 200,
                "refused": bool(body["warnings"]),
                "predicted": body["bone_age_months"],
                "lower": interval and interval["lower"],
                "upper": interval and interval["upper"],
                "classification": a["classification"],
                "plain_rule": "indeterminate"
                if z is None
                else "delayed"
                if z < -2
                else "advanced"
                if z > 2
                else "normal",
            }
        )
    return rows


def rate(items: list[dict]) -> str:
    n = len(items)
    k = sum(i["refused"] for i in items)
    return f"{k} of {n} ({k / n:.1%})" if n else "–"


def summarise(half: list[dict]) -> dict:
    answered = [r for r in half if r["status"] == 200]
    covered = [r for r in answered if r["lower"] is not None]

    def coverage(rows):
        return sum(r["lower"] <= r["true"] <= r["upper"] for r in rows) / len(rows) if rows else None

    def calls(key):
        counts = {c: sum(r[key] == c for r in answered) for c in ("normal", "delayed", "advanced", "indeterminate")}
        return counts | {"false_call_rate": (counts["delayed"] + counts["advanced"]) / len(answered)}

    return {
        "n": len(half),
        "mae": sum(abs(r["predicted"] - r["true"]) for r in answered) / len(answered),
        "coverage": coverage(covered),
        "mean_width": sum(r["upper"] - r["lower"] for r in covered) / len(covered) if covered else None,
        "coverage_by_band": {
            name: {
                "n": len(rows),
                "coverage": coverage(rows),
                "mean_width": sum(r["upper"] - r["lower"] for r in rows) / len(rows) if rows else None,
            }
            for name, lo, hi in AGE_BANDS
            for rows in [[r for r in covered if lo <= r["true"] < hi]]
        },
        "calls_plain_rule": calls("plain_rule"),
        "calls_interval_rule": calls("classification"),
    }


def report(results: dict) -> str:
    s, level = results["halfres"], results["interval_level"]
    lines = [
        "# Trust: interval coverage, false calls and refusals",
        "",
        f"Measured {results['date']} with `python -m bench.trust` on `{results['model']}` "
        f"(version `{results['version']}`), through the running service set to warn. "
        f"Interval level {level:.0%}.",
        "",
        "## Prediction interval on the 300 half-resolution RSNA radiographs",
        "",
        f"MAE {s['mae']:.2f} months. Coverage {s['coverage']:.1%} (target {level:.0%} ± 4 points), "
        f"mean width {s['mean_width']:.1f} months."
        if s["coverage"] is not None
        else "This model file carries no interval.",
        "",
        "| true bone age | n | coverage | mean width (months) |",
        "|---|---|---|---|",
        *[
            f"| {band} | {v['n']} | {v['coverage']:.1%} | {v['mean_width']:.1f} |"
            if v["n"]
            else f"| {band} | 0 | – | – |"
            for band, v in s["coverage_by_band"].items()
        ],
        "",
        "## False calls: each radiograph's true bone age given as the child's age",
        "",
        "A perfect reader calls every one *normal*; *delayed* or *advanced* is a false call.",
        "",
        "| rule | normal | indeterminate | delayed | advanced | false-call rate |",
        "|---|---|---|---|---|---|",
    ]
    for name, key in (
        ("±2 SD on the estimate (before)", "calls_plain_rule"),
        ("interval rule (now)", "calls_interval_rule"),
    ):
        c = s[key]
        lines.append(
            f"| {name} | {c['normal']} | {c['indeterminate']} | {c['delayed']} | {c['advanced']} | "
            f"{c['false_call_rate']:.1%} |"
        )
    lines += [
        "",
        "## Refusals (the gate's verdict; 4xx for files that cannot be decoded)",
        "",
        "| set | refused | target |",
        "|---|---|---|",
        *[f"| {row['set']} | {row['refused']} | {row['target']} |" for row in results["refusals"]],
        "",
        "### Each negative",
        "",
        "| image | refused | why |",
        "|---|---|---|",
        *[f"| {i['name']} | {'yes' if i['refused'] else '**no**'} | {i['reason']} |" for i in results["negatives"]],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trust", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--out", type=Path, default=Path("docs/trust"))
    args = parser.parse_args(argv)
    root = data_root()
    args.out.mkdir(parents=True, exist_ok=True)
    hands = [
        *sorted((root / "rsna-halfres" / "images").glob("*.png"))[:6],
        root / "unlabelled" / "hospital-jpeg" / "m9.jpg",
        root / "dicom" / "hand-dx-ge-14bit.dcm",
    ]
    negatives_in = packaged() + made_from_hands(hands)
    env = {"BONEAGE_MODEL_PATH": str(args.model), "BONEAGE_OUT_OF_DISTRIBUTION": "warn"}
    log = Path(tempfile.mkdtemp(prefix="bench-trust-")) / "service.log"
    with (
        running("app.main:app", log, env) as (url, _),
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        info = client.get("/v1/model").json()
        half = labelled(client, root / "rsna-halfres")
        full = [
            ask(client, p.name, p.read_bytes(), {"sex": "female"})
            for p in sorted((root / "rsna-fullres" / "images").glob("*"))
        ]
        hospital = [
            ask(client, p.name, p.read_bytes(), {"sex": "female"})
            for p in sorted((root / "unlabelled" / "hospital-jpeg").glob("*"))
        ]
        infant = [
            ask(client, p.name, p.read_bytes(), {"sex": "female"})
            for p in sorted((root / "unlabelled" / "infant-png").glob("*"))
        ]
        dicom = [ask(client, p.name, p.read_bytes(), {}) for p in sorted((root / "dicom").glob("*.dcm"))]
        negatives = [ask(client, name, data, {"sex": "female"}) for name, data in negatives_in]
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model.name,
        "version": info["version"],
        "interval_level": (info.get("interval") or {}).get("level", 0.9),
        "gate": info.get("gate"),
        "halfres": summarise(half),
        "refusals": [
            {"set": f"negatives ({len(negatives)})", "refused": rate(negatives), "target": "≥ 95%"},
            {"set": "RSNA half-resolution (300)", "refused": rate(half), "target": "≤ 2%"},
            {"set": "RSNA full-resolution (21)", "refused": rate(full), "target": "–"},
            {"set": "hospital JPEGs (16)", "refused": rate(hospital), "target": "≤ 1"},
            {"set": "infant PNGs (10)", "refused": rate(infant), "target": "–"},
            {"set": "real GE DICOM (1)", "refused": rate(dicom), "target": "–"},
        ],
        "negatives": negatives,
        "real_hands_refused": [i["name"] for i in full + hospital + infant + dicom if i["refused"]]
        + [r["id"] for r in half if r["refused"]],
    }
    (args.out / "trust.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "trust.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
