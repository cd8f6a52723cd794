"""bf16 vs fp32 held-out accuracy, paired per example, from the quality registry's two runs."""
import json, random, sqlite3, sys
db, run32, run16 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = sqlite3.connect(db)
def load(run):
    out = {}
    for m, t, pred, labels, sec, mem in c.execute(
            "select method, task, predictions, labels, seconds, memory from eval_results where run_id=?", (run,)):
        p, l = json.loads(pred), json.loads(labels)
        out[(m, t)] = ([int(a == b) for a, b in zip(p, l)], sec, json.loads(mem) if mem else {})
    return out
a, b = load(run32), load(run16)
methods = sorted({m for m, _ in a})
rng = random.Random(0)
rows = []
for m in methods:
    tasks = sorted(t for mm, t in a if mm == m)
    x = [a[(m, t)][0] for t in tasks]; y = [b[(m, t)][0] for t in tasks]
    acc32 = sum(sum(v) / len(v) for v in x) / len(x); acc16 = sum(sum(v) / len(v) for v in y) / len(y)
    diffs = []
    for _ in range(2000):  # paired bootstrap over examples within each task, mean of task means
        s = 0
        for xv, yv in zip(x, y):
            idx = [rng.randrange(len(xv)) for _ in xv]
            s += sum(yv[i] - xv[i] for i in idx) / len(xv)
        diffs.append(s / len(x))
    diffs.sort()
    flips = sum(int(p != q) for xv, yv in zip(x, y) for p, q in zip(xv, yv))
    sec32 = sum(a[(m, t)][1] for t in tasks); sec16 = sum(b[(m, t)][1] for t in tasks)
    rss32 = max(a[(m, t)][2].get("peak_rss_mib", 0) for t in tasks); rss16 = max(b[(m, t)][2].get("peak_rss_mib", 0) for t in tasks)
    rows.append((m, acc32, acc16, (acc16 - acc32) * 100, diffs[50] * 100, diffs[1949] * 100, flips, sum(len(v) for v in x), sec32, sec16, rss32, rss16))
print("| method | float32 held-out avg | bfloat16 held-out avg | bf16 − fp32 (points) | paired 95% CI | examples whose correctness differs | job seconds fp32 / bf16 | peak RSS MiB fp32 / bf16 |")
print("|---|---:|---:|---:|---|---:|---:|---:|")
for m, p32, p16, d, lo, hi, f, n, s32, s16, r32, r16 in rows:
    print(f"| {m} | {p32:.3f} | {p16:.3f} | {d:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {f} of {n} | {s32:.0f} / {s16:.0f} | {r32:.0f} / {r16:.0f} |")
