// Pure formatting used by the dashboard (same wording as the tray's tray_text.rs).
import { test } from "node:test";
import assert from "node:assert/strict";
import fmt from "../src/format.js";

test("speedups read as signed percentages with intervals", () => {
  assert.equal(fmt.pct(1.031), "+3.1 %");
  assert.equal(fmt.pct(0.95), "−5.0 %");
  assert.equal(fmt.pctInterval(1.031, 1.008, 1.05), "+3.1 % [+0.8, +5.0]");
  assert.equal(fmt.pctInterval(1.2), "+20.0 %");
  assert.equal(fmt.pct(undefined), "—");
});

test("policy ranges and plans read as words", () => {
  assert.equal(fmt.range([1, 1]), "1");
  assert.equal(fmt.range([257, null]), "≥ 257");
  assert.equal(fmt.range([2, 16]), "2 – 16");
  assert.equal(fmt.range(undefined), "any");
  assert.equal(fmt.plan({ kind: "native" }), "native");
  assert.equal(fmt.plan({ kind: "split", tile_m: 512, tile_n: 16384, tile_k: null }), "split M×512 N×16384");
  assert.equal(fmt.plan({ kind: "gemm", block_m: 64, block_n: 64, block_k: 32, warps: 4 }), "gemm block_m=64, block_n=64, block_k=32, warps=4");
});

test("sizes and times", () => {
  assert.equal(fmt.bytes(24 * 1024 ** 3), "24 GiB");
  assert.equal(fmt.bytes(1536), "1.5 KiB");
  assert.equal(fmt.seconds(0.00123), "1.23 ms");
  assert.equal(fmt.seconds(4.2e-5), "42.0 µs");
  assert.equal(fmt.duration(3725), "1 h 2 min");
});

test("a policy's fusion reads as the daemon says it", () => {
  assert.equal(fmt.members(["q_proj", "k_proj", "v_proj"]), "q/k/v");
  assert.equal(fmt.members(["gate", "shared_expert_gate"]), "gate/shared_expert_gate");
  const groups = [{ scope: "model.layers.*.self_attn", members: ["q_proj", "k_proj", "v_proj"] },
    { scope: "model.layers.*.mlp", members: ["gate_proj", "up_proj"] }];
  assert.equal(fmt.fusion({ fusion: { groups } }), "q/k/v fused, gate/up fused");
  assert.equal(fmt.fusion({ fusion: { groups, training: false } }), "q/k/v fused, gate/up fused (inference only)");
  assert.equal(fmt.fusion({ matmul: {} }), "");
});
