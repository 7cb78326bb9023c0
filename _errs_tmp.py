import time
from tests.tuning.test_tuning_pipeline import METHODS, MODEL, STEPS, train, load_config, run_ranks, grad_err, _pipeline_cases

if __name__ == "__main__":
    t = time.time()
    ser = {m: train(load_config(None, {**MODEL, **k}), 1, 0) for m, k in METHODS.items()}
    print("serial s", round(time.time() - t, 1)); t = time.time()
    res = run_ranks(_pipeline_cases, 2, timeout_s=240.0)
    print("spawn s", round(time.time() - t, 1))
    for key in res[0]:
        want = ser[key[0]]
        for s in range(STEPS):
            lerr = max(abs(r[key]["losses"][s] - want["losses"][s]) / abs(want["losses"][s]) for r in res)
            errs = [(grad_err(t, want["grads"][s][n], want["grads"][s]), n) for r in res for n, t in r[key]["grads"][s].items()]
            print(key, f"step {s+1} loss rel err {lerr:.2e}  max grad rel err {max(errs)[0]:.2e} ({max(errs)[1]})")
        print(key, "trainable tensors per stage", [len(r[key]["grads"][0]) for r in res], "frozen-with-grad", [r[key]['frozen_grads'] for r in res])
