// The status page's live updates (docs/status.md, "Live updates").
//
// The page is complete without this script: the server renders it, and a reload shows
// what is new.  The script only saves the reload.  It listens to /status/events, where
// the server says "what you show may have changed" (after a sync that changed something,
// or when the connection counters moved), and then fetches the same page (same ?q= and
// ?page=) with ?fragment=1, which is just the contents of <main>, and swaps them in.
// The search box is outside <main>, so what is typed there, and the focus, stay put.
"use strict";

const main = document.getElementById("status");
const badge = document.getElementById("live");

let fetching = false; // a fetch is under way
let again = false; // a message came during it: fetch once more when it is done

async function refresh() {
  if (fetching) {
    again = true; // many messages during one fetch cost one more fetch, not many
    return;
  }
  fetching = true;
  try {
    do {
      again = false;
      const url = new URL(window.location.href);
      url.searchParams.set("fragment", "1");
      const response = await fetch(url, { cache: "no-store" });
      if (!response.ok) {
        throw new Error(`HTTP ${response.status}`);
      }
      main.innerHTML = await response.text();
      show("live", "live");
    } while (again);
  } catch (error) {
    show("stale", `not updated: ${error.message}`);
  } finally {
    fetching = false;
  }
}

function show(state, text) {
  badge.className = state;
  badge.textContent = text;
}

if (main && badge && window.EventSource) {
  const events = new EventSource("/status/events");
  // Every message means "fetch again"; what it carries ({"generation", "reason"}) is
  // for people reading the stream.  The first one comes as soon as the stream opens.
  events.onmessage = refresh;
  // The stream ends now and then (the server ends it every few minutes, or the proxy
  // stopped): EventSource reconnects by itself, and its first message refreshes.
  events.onerror = () => show("stale", "reconnecting");
}
