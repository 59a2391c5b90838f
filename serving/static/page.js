// The listening page: ask for two candidates, play them, post the user's verdict.
// It calls the API with a short-lived page token (GET /page-token), not an API key,
// and sends each vote with the vote token of its generation.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // {generationId, clipIds: [a, b], voteToken}
let pageToken = null;

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

async function generate(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  $("generate").disabled = true;
  $("status").textContent = "Generating…";
  $("feedback-status").textContent = "";
  try {
    const response = await postJson("/v1/generations", {
      prompt, n: 2, duration_s: Number($("duration").value), user_id: userId(),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(errorText(body, response.status));
    current = {
      generationId: body.generation_id,
      clipIds: body.clips.map((c) => c.clip_id),
      voteToken: body.vote_token,
    };
    $("audio-a").src = `${body.clips[0].download_url}?format=wav`;
    $("audio-b").src = `${body.clips[1].download_url}?format=wav`;
    $("pair").hidden = false;
    $("pair").dataset.generationId = body.generation_id;
    setVoting(true);
    $("status").textContent = `Listen to both clips, then give your trophy (${body.clips[0].duration_s} s each).`;
  } catch (err) {
    $("status").textContent = `Could not generate: ${err.message}`;
  } finally {
    $("generate").disabled = false;
  }
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
document.querySelectorAll("button.vote").forEach((b) => b.addEventListener("click", () => vote(b.dataset.choice)));
