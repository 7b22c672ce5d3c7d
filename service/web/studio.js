// The merchant studio: sign in with a merchant key, create designs, preview and select candidates, and watch a
// design's net orders and production status (GET /designs/{id}, polled while the design is open).
"use strict";

(() => {
  const { call, imageUrl, el, showError, clearError, signIn, keyStore } = PerFusion;
  const POLL_MS = 1000;
  const store = keyStore("perfusion.studio.key");
  const $ = (id) => document.getElementById(id);
  const errorBox = $("error");

  let caller = null;
  let openDesignId = null;
  let pollRound = 0; // a poll loop stops when the design it was started for is no longer open
  let impression = null; // the candidates response now shown

  const designIdInHash = () => {
    const match = /^#design=(.+)$/.exec(window.location.hash);
    return match ? decodeURIComponent(match[1]) : null;
  };

  function showSignedOut() {
    caller = null;
    openDesignId = null;
    pollRound += 1;
    $("workspace").hidden = true;
    $("sign-in").hidden = false;
    $("sign-out").hidden = true;
    $("who").textContent = "";
  }

  async function showSignedIn(signedIn) {
    caller = signedIn;
    $("sign-in").hidden = true;
    $("workspace").hidden = false;
    $("sign-out").hidden = false;
    $("who").textContent = `merchant ${caller.principal}`;
    await loadDesigns();
    await route();
  }

  async function loadDesigns() {
    const list = $("designs");
    try {
      const { designs } = await call(store.get(), "GET", "/designs");
      list.replaceChildren(
        ...designs
          .slice()
          .reverse()
          .map((design) =>
            el(
              "li",
              { dataset: { designId: design.design_id } },
              el("a", { href: `#design=${encodeURIComponent(design.design_id)}` }, design.prompt),
              el("span", { class: "muted small" }, ` production at ${design.order_threshold}`),
            ),
          ),
      );
      $("no-designs").hidden = designs.length > 0;
    } catch (error) {
      showError(errorBox, error);
    }
  }

  async function route() {
    const designId = designIdInHash();
    for (const item of $("designs").children) {
      item.classList.toggle("current", item.dataset.designId === designId);
    }
    if (designId === openDesignId) {
      return;
    }
    openDesignId = designId;
    pollRound += 1;
    impression = null;
    $("candidates").replaceChildren();
    $("select-result").textContent = "";
    updateSelectButton();
    $("design-view").hidden = true;
    $("design-missing").hidden = true;
    if (designId !== null) {
      pollStatus(designId, pollRound);
    }
  }

  async function pollStatus(designId, round) {
    while (round === pollRound && caller !== null) {
      try {
        showStatus(await call(store.get(), "GET", `/designs/${encodeURIComponent(designId)}`));
      } catch (error) {
        if (round !== pollRound) {
          return;
        }
        if (error.status === 403 || error.status === 404) {
          $("design-view").hidden = true;
          $("design-missing").hidden = false;
          $("design-missing-detail").textContent = error.problem.detail;
          return;
        }
        showError(errorBox, error); // Kafka or the service away for a moment: keep polling
      }
      await PerFusion.sleep(POLL_MS);
    }
  }

  function showStatus(status) {
    if (status.design_id !== openDesignId) {
      return;
    }
    $("design-view").hidden = false;
    $("design-prompt").textContent = status.prompt;
    $("design-id").textContent = status.design_id;
    $("net-orders").textContent = String(status.net_orders);
    $("threshold-value").textContent = String(status.order_threshold);
    const bar = $("demand-bar");
    bar.max = status.order_threshold;
    bar.value = Math.min(status.net_orders, status.order_threshold);
    const production = $("production-status");
    production.classList.toggle("triggered", status.production_triggered);
    if (status.production_triggered) {
      const when = status.production_ts ? ` at ${new Date(status.production_ts * 1000).toLocaleTimeString()}` : "";
      production.textContent = `production triggered${when}`;
    } else {
      const missing = Math.max(status.order_threshold - status.net_orders, 0);
      production.textContent = `collecting orders: ${missing} more to start production`;
    }
  }

  async function preview(event) {
    event.preventDefault();
    const designId = openDesignId;
    const button = $("preview");
    button.disabled = true;
    $("select-result").textContent = "drawing candidates...";
    try {
      const k = Number($("k").value);
      const served = await call(store.get(), "POST", `/designs/${encodeURIComponent(designId)}/candidates`, { k });
      if (designId !== openDesignId) {
        return;
      }
      impression = served;
      const cards = await Promise.all(
        served.candidates.map(async (candidate) =>
          el(
            "label",
            { class: "candidate", dataset: { imageId: candidate.image_id } },
            el("img", {
              src: await imageUrl(store.get(), candidate.url),
              alt: `candidate ${candidate.position + 1}`,
              width: 128,
              height: 128,
            }),
            el("input", { type: "checkbox", value: candidate.image_id, onchange: updateSelectButton }),
            el("span", {}, `#${candidate.position + 1}`),
          ),
        ),
      );
      $("candidates").replaceChildren(...cards);
      $("select-result").textContent = `${served.candidates.length} candidates drawn by model ${served.model_version}`;
      clearError(errorBox);
    } catch (error) {
      $("select-result").textContent = "";
      showError(errorBox, error);
    } finally {
      button.disabled = false;
      updateSelectButton();
    }
  }

  function tickedImageIds() {
    return [...$("candidates").querySelectorAll("input[type=checkbox]:checked")].map((box) => box.value);
  }

  function updateSelectButton() {
    $("select").disabled = impression === null || tickedImageIds().length === 0;
  }

  async function selectTicked() {
    const imageIds = tickedImageIds();
    try {
      const accepted = await call(store.get(), "POST", "/events", {
        kind: "select",
        design_id: impression.design_id,
        impression_id: impression.impression_id,
        image_ids: imageIds,
      });
      for (const card of $("candidates").children) {
        card.classList.toggle("selected", imageIds.includes(card.dataset.imageId));
      }
      const count = imageIds.length === 1 ? "1 candidate" : `${imageIds.length} candidates`;
      $("select-result").textContent = `Selected ${count} (event ${accepted.event_id})`;
      clearError(errorBox);
    } catch (error) {
      showError(errorBox, error);
    }
  }

  async function createDesign(event) {
    event.preventDefault();
    const button = $("create");
    button.disabled = true;
    try {
      const created = await call(store.get(), "POST", "/designs", {
        prompt: $("prompt").value,
        order_threshold: Number($("threshold").value),
      });
      $("prompt").value = "";
      clearError(errorBox);
      await loadDesigns();
      window.location.hash = `design=${encodeURIComponent(created.design_id)}`;
    } catch (error) {
      showError(errorBox, error);
    } finally {
      button.disabled = false;
    }
  }

  async function submitKey(event) {
    event.preventDefault();
    const signedIn = await signIn(store, $("key").value.trim(), "merchant", "a merchant's", errorBox);
    $("key").value = "";
    if (signedIn !== null) {
      await showSignedIn(signedIn);
    }
  }

  function signOut() {
    store.clear();
    clearError(errorBox);
    showSignedOut();
  }

  $("sign-in-form").addEventListener("submit", submitKey);
  $("sign-out").addEventListener("click", signOut);
  $("create-form").addEventListener("submit", createDesign);
  $("preview-form").addEventListener("submit", preview);
  $("select").addEventListener("click", selectTicked);
  window.addEventListener("hashchange", () => caller !== null && route());

  (async () => {
    const key = store.get();
    const signedIn = key ? await signIn(store, key, "merchant", "a merchant's", errorBox) : null;
    if (signedIn !== null) {
      await showSignedIn(signedIn);
    } else {
      showSignedOut();
    }
  })();
})();
