"""The eight dense cases of tests/memory/test_profile.py through qlora.memory.profile.run_profile:
estimate against the CPU measurement per component. Run from the repository root:
python benchmarks/results/2026-11-29-cpu-memory-estimates/profile_cases.py [CASE ...]"""
import json, sys, tempfile, torch
sys.path.insert(0, "tests/memory")  # the test's model and options
from test_profile import SCALED, SEQ, OPTIONS
from qlora.memory import profile
torch.set_num_threads(1)
d = tempfile.mkdtemp(); path = d + "/config.json"; open(path, "w").write(json.dumps(SCALED))
for name in sys.argv[1:] or OPTIONS:
    s = profile.ProfileSettings(model=path, seq_len=SEQ, batch_size=1, rank=8, dtype="bfloat16", **OPTIONS[name])
    r = profile.run_profile(s, steps=2, out_dir=d)
    print(name)
    for row in r["components"]:
        if row["measured"] or row["estimate"]:
            print(f"   {row['name']:28s} est {row['estimate']:>10} meas {row['measured']:>10} err {row['relative_error']:+.3f}")
