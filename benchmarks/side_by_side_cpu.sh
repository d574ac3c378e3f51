#!/bin/sh
# Speed against the released TransDiff on CPU: ../shared/bench/side_by_side.py at the script's
# default configuration and at width 768 / 12 heads, 1 and 2 threads, each writing its JSON to
# benchmarks/results/side_by_side_cpu_w<width>_t<threads>.json. Run from the project root; needs `diffusers`
# for the released code. SIDE_BY_SIDE (the script), REPEATS (paired rounds, default 5) and CONFIGS
# ("width:heads:threads ...", default all four) override the defaults.
set -e
script=${SIDE_BY_SIDE:-../shared/bench/side_by_side.py}
repeats=${REPEATS:-5}
for cfg in ${CONFIGS:-256:4:1 256:4:2 768:12:1 768:12:2}; do
    IFS=: read -r width heads threads <<END
$cfg
END
    out=benchmarks/results/side_by_side_cpu_w${width}_t${threads}.json
    echo "$(date -u +%H:%M:%S) width $width, $threads thread(s), load: $(cut -d' ' -f1-3 /proc/loadavg)"
    python "$script" --width "$width" --heads "$heads" --threads "$threads" --repeats "$repeats" --out "$out" \
        > /dev/null
    python -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[1], 'same samples to',
d['same_samples_max_abs_diff'], 'sampling', round(d['sampling']['ratio'], 3), 'training',
round(d['training']['ratio'], 3))" "$out"
done
echo "$(date -u +%H:%M:%S) done, load: $(cut -d' ' -f1-3 /proc/loadavg)"
