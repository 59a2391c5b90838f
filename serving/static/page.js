// The listening page: ask for two candidates, show their waveforms, play them, post the user's verdict.
// It calls the API with a short-lived page token (GET /page-token), not an API key,
// and sends each vote with the vote token of its generation. Each clip is fetched once: the
// bytes feed the <audio> element (as a blob URL) and the Web Audio API, which decodes them
// for the waveform drawn on a canvas.
"use strict";

const $ = (id) => document.getElementById(id);
const SIDES = ["a", "b"];
const COLUMNS = 1000; // peaks kept per clip; drawn as one bar per 3 CSS pixels
let current = null; // {generationId, clipIds: [a, b], voteToken}
let pageToken = null;
const waves = { a: null, b: null }; // {min, max} per column once decoded; "failed" if it could not be
const blobUrls = [];

async function freshPageToken() {
  const response = await fetch("/page-token", { cache: "no-store" });
  if (!response.ok) throw new Error(`no page token (HTTP ${response.status})`);
  pageToken = (await response.json()).token;
  return pageToken;
}

// POST JSON with the page token; a 401 (token expired) fetches a new token and tries once more.
async function postJson(path, payload) {
  for (let attempt = 0; ; attempt++) {
    const token = pageToken || (await freshPageToken());
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify(payload),
    });
    if (response.status !== 401 || attempt > 0) return response;
    pageToken = null;
  }
}

function hexId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function userId() {
  let id = localStorage.getItem("musicrl-user-id");
  if (!id) {
    id = hexId();
    localStorage.setItem("musicrl-user-id", id);
  }
  return id;
}

// Seconds actually played (the union of played ranges), not the clip length.
function listenedSeconds(audio) {
  let total = 0;
  for (let i = 0; i < audio.played.length; i++) total += audio.played.end(i) - audio.played.start(i);
  return Math.round(total * 1000) / 1000;
}

function errorText(body, status) {
  if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  if (body && body.detail) return String(body.detail);
  return `HTTP ${status}`;
}

function setVoting(enabled) {
  document.querySelectorAll("button.vote").forEach((b) => { b.disabled = !enabled; });
}

// ------------------------------------------------------------------ waveforms and players

function clock(seconds) {
  if (!Number.isFinite(seconds)) return "0:00";
  const whole = Math.floor(seconds);
  return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")}`;
}

// Min and max of the first channel over COLUMNS equal slices, scaled so the loudest peak fills the height.
function peaks(buffer) {
  const samples = buffer.getChannelData(0);
  const columns = Math.max(1, Math.min(COLUMNS, samples.length));
  const min = new Float32Array(columns);
  const max = new Float32Array(columns);
  let loudest = 1e-6;
  for (let c = 0; c < columns; c++) {
    let lo = 0;
    let hi = 0;
    const end = Math.floor(((c + 1) * samples.length) / columns);
    for (let i = Math.floor((c * samples.length) / columns); i < end; i++) {
      if (samples[i] < lo) lo = samples[i];
      if (samples[i] > hi) hi = samples[i];
    }
    min[c] = lo;
    max[c] = hi;
    loudest = Math.max(loudest, -lo, hi);
  }
  for (let c = 0; c < columns; c++) { min[c] /= loudest; max[c] /= loudest; }
  return { min, max };
}

async function decode(bytes, sampleRate) {
  const Offline = window.OfflineAudioContext || window.webkitOfflineAudioContext;
  const context = new Offline(1, 1, sampleRate || 16000);
  return context.decodeAudioData(bytes);
}

function drawWave(side) {
  const canvas = $(`wave-${side}`);
  const audio = $(`audio-${side}`);
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
  const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const middle = height / 2;
  const wave = waves[side];
  const played = audio.duration > 0 ? audio.currentTime / audio.duration : 0;
  if (!wave || wave === "failed") {
    ctx.fillStyle = "#c9ced6";
    ctx.fillRect(0, middle - ratio / 2, width, ratio);
    if (wave === "failed") {
      ctx.fillStyle = "#6b7280";
      ctx.font = `${12 * ratio}px system-ui, sans-serif`;
      ctx.fillText("no waveform (the clip still plays)", 8 * ratio, middle - 6 * ratio);
    }
    return;
  }
  const columns = wave.min.length;
  const bars = Math.max(1, Math.min(columns, Math.floor(width / (3 * ratio))));
  const step = width / bars;
  for (let bar = 0; bar < bars; bar++) {
    let lo = 0;
    let hi = 0;
    for (let c = Math.floor((bar * columns) / bars), end = Math.floor(((bar + 1) * columns) / bars); c < end; c++) {
      lo = Math.min(lo, wave.min[c]);
      hi = Math.max(hi, wave.max[c]);
    }
    const top = middle - hi * middle * 0.95;
    const bottom = middle - lo * middle * 0.95;
    ctx.fillStyle = (bar + 0.5) / bars <= played ? "#2f6db5" : "#a9bcd6";
    ctx.fillRect(bar * step, top, Math.max(ratio, step - ratio), Math.max(ratio, bottom - top));
  }
  if (played > 0) {
    ctx.fillStyle = "#1b3f6b";
    ctx.fillRect(Math.min(width - ratio, played * width), 0, ratio, height);
  }
}

function showTime(side) {
  const audio = $(`audio-${side}`);
  $(`time-${side}`).textContent = `${clock(audio.currentTime)} / ${clock(Math.round(audio.duration))}`;
}

// While a clip plays, its waveform fills in as it goes.
function animate(side) {
  drawWave(side);
  showTime(side);
  if (!$(`audio-${side}`).paused) requestAnimationFrame(() => animate(side));
}

async function loadClip(side, clip) {
  const audio = $(`audio-${side}`);
  const canvas = $(`wave-${side}`);
  const url = `${clip.download_url}?format=wav`;
  waves[side] = null;
  delete canvas.dataset.drawn;
  drawWave(side);
  let bytes = null;
  try {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    bytes = await response.arrayBuffer();
    const blobUrl = URL.createObjectURL(new Blob([bytes], { type: "audio/wav" }));
    blobUrls.push(blobUrl);
    audio.src = blobUrl;
  } catch (err) {
    audio.src = url; // the player may still manage; the waveform cannot
  }
  $(`play-${side}`).disabled = false;
  try {
    if (!bytes) throw new Error("no audio bytes");
    waves[side] = peaks(await decode(bytes.slice(0), clip.sample_rate));
    canvas.dataset.drawn = "true";
  } catch (err) {
    waves[side] = "failed";
    canvas.dataset.drawn = "failed";
  }
  drawWave(side);
  showTime(side);
}

function togglePlay(side) {
  const audio = $(`audio-${side}`);
  if (audio.paused) audio.play().catch(() => {});
  else audio.pause();
}

function seek(side, event) {
  const audio = $(`audio-${side}`);
  if (!(audio.duration > 0)) return;
  const rect = event.currentTarget.getBoundingClientRect();
  audio.currentTime = Math.min(1, Math.max(0, (event.clientX - rect.left) / rect.width)) * audio.duration;
  drawWave(side);
  showTime(side);
}

function resetPair() {
  for (const side of SIDES) {
    const audio = $(`audio-${side}`);
    audio.pause();
    $(`clip-${side}`).classList.remove("chosen");
    $(`play-${side}`).disabled = true;
  }
  while (blobUrls.length) URL.revokeObjectURL(blobUrls.pop());
  $("result").hidden = true;
  $("pair").classList.remove("voted");
}

// ------------------------------------------------------------------ generate and vote

async function generate(event) {
  if (event) event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt) return;
  $("generate").disabled = true;
  $("again").disabled = true;
  $("status").textContent = "Generating…";
  $("feedback-status").textContent = "";
  try {
    const response = await postJson("/v1/generations", {
      prompt, n: 2, duration_s: Number($("duration").value), user_id: userId(),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(errorText(body, response.status));
    resetPair();
    current = {
      generationId: body.generation_id,
      clipIds: body.clips.map((c) => c.clip_id),
      voteToken: body.vote_token,
    };
    $("pair").hidden = false;
    $("pair").dataset.generationId = body.generation_id;
    setVoting(true);
    $("status").textContent = `Listen to both clips, then give your trophy (${body.clips[0].duration_s} s each).`;
    await Promise.all(SIDES.map((side, i) => loadClip(side, body.clips[i])));
  } catch (err) {
    $("status").textContent = `Could not generate: ${err.message}`;
  } finally {
    $("generate").disabled = false;
    $("again").disabled = false;
  }
}

// After the vote: the chosen clip is marked and a line says what was recorded.
function showResult(choice, feedback) {
  for (const side of SIDES) $(`clip-${side}`).classList.toggle("chosen", choice === side);
  const verdict = choice === "tie" ? "You called it a tie." : `You gave the trophy to clip ${choice.toUpperCase()}.`;
  $("result-text").textContent =
    `${verdict} You listened to ${feedback.listen_a_s.toFixed(1)} s of A and ${feedback.listen_b_s.toFixed(1)} s of B.`;
  $("result").hidden = false;
  $("pair").classList.add("voted");
}

async function vote(choice) {
  if (!current) return;
  setVoting(false);
  const feedback = {
    event_id: hexId(), // the idempotency key: retries re-send the same one
    generation_id: current.generationId,
    clip_a_id: current.clipIds[0],
    clip_b_id: current.clipIds[1],
    choice,
    listen_a_s: listenedSeconds($("audio-a")),
    listen_b_s: listenedSeconds($("audio-b")),
    user_id: userId(),
    client_ts: new Date().toISOString(),
    app_id: "web",
    vote_token: current.voteToken,
  };
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const response = await postJson("/v1/feedback", feedback);
      if (response.status === 202) {
        $("feedback-status").textContent = "Thanks, your vote was recorded.";
        showResult(choice, feedback);
        return;
      }
      const body = await response.json().catch(() => null);
      if (response.status !== 503 && response.status !== 429) throw new Error(errorText(body, response.status));
      const wait = Math.min(Number(response.headers.get("Retry-After") || "1"), 10);
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    } catch (err) {
      $("feedback-status").textContent = `Vote not recorded: ${err.message}`;
      setVoting(true);
      return;
    }
  }
  $("feedback-status").textContent = "Vote not recorded: the service is busy, try again.";
  setVoting(true);
}

$("generate-form").addEventListener("submit", generate);
$("again").addEventListener("click", () => generate(null));
document.querySelectorAll("button.vote").forEach((b) => b.addEventListener("click", () => vote(b.dataset.choice)));
for (const side of SIDES) {
  const audio = $(`audio-${side}`);
  const other = $(`audio-${side === "a" ? "b" : "a"}`);
  $(`play-${side}`).addEventListener("click", () => togglePlay(side));
  $(`wave-${side}`).addEventListener("click", (event) => seek(side, event));
  audio.addEventListener("play", () => {
    other.pause(); // one clip at a time, as in a listening test
    $(`play-${side}`).textContent = "\u275A\u275A Pause";
    animate(side);
  });
  audio.addEventListener("pause", () => { $(`play-${side}`).textContent = "\u25B6 Play"; drawWave(side); });
  audio.addEventListener("loadedmetadata", () => showTime(side));
  audio.addEventListener("timeupdate", () => showTime(side));
}
window.addEventListener("resize", () => SIDES.forEach(drawWave));
