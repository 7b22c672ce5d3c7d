// The storefront: sign in with a shopper key, see every design on sale drawn for you (a group of candidates
// generated with your features), click the one you like (a click event) and buy it (POST /shop/checkout, which
// the service reports as the shop's order system would).
"use strict";

(() => {
  const { call, imageUrl, el, showError, clearError, signIn, keyStore } = PerFusion;
  const CANDIDATES_PER_DESIGN = 4;
  const store = keyStore("perfusion.shop.key");
  const $ = (id) => document.getElementById(id);
  const errorBox = $("error");

  let caller = null;

  function showSignedOut() {
    caller = null;
    $("storefront").hidden = true;
    $("sign-in").hidden = false;
    $("sign-out").hidden = true;
    $("who").textContent = "";
    $("listing").replaceChildren();
    $("orders").replaceChildren();
  }

  async function showSignedIn(signedIn) {
    caller = signedIn;
    $("sign-in").hidden = true;
    $("storefront").hidden = false;
    $("sign-out").hidden = false;
    $("who").textContent = `shopper ${caller.principal}`;
    await loadListing();
  }

  async function loadListing() {
    let designs;
    try {
      ({ designs } = await call(store.get(), "GET", "/shop/designs"));
    } catch (error) {
      showError(errorBox, error);
      return;
    }
    const cards = designs.map(designCard);
    $("listing").replaceChildren(...cards.map((card) => card.element));
    $("nothing-listed").hidden = designs.length > 0;
    // One design after another: each group takes the generator a moment, and a full queue answers 503.
    for (const card of cards) {
      await card.draw();
    }
  }

  function designCard(design) {
    const grid = el("div", { class: "grid candidates" });
    const quantity = el("input", { class: "quantity", type: "number", min: 1, max: 100, value: 1, "aria-label": "quantity" });
    const buy = el("button", { class: "buy", type: "button", disabled: true }, "Buy");
    const redraw = el("button", { class: "redraw secondary", type: "button" }, "Show me others");
    const result = el("p", { class: "order-result result", role: "status" });
    const element = el(
      "article",
      { class: "panel design-card", dataset: { designId: design.design_id } },
      el("h2", {}, design.prompt),
      grid,
      el("div", { class: "inline" }, el("label", {}, "Quantity ", quantity), buy, redraw),
      result,
    );
    let served = null;
    let chosen = null;

    async function draw() {
      served = null;
      chosen = null;
      buy.disabled = true;
      result.textContent = "drawing it for you...";
      try {
        const group = await call(store.get(), "POST", `/designs/${encodeURIComponent(design.design_id)}/candidates`, {
          k: CANDIDATES_PER_DESIGN,
        });
        const buttons = await Promise.all(group.candidates.map(async (candidate) => candidateButton(candidate)));
        grid.replaceChildren(...buttons);
        served = group;
        result.textContent = "";
      } catch (error) {
        result.textContent = "";
        showError(errorBox, error);
      }
    }

    async function candidateButton(candidate) {
      const button = el(
        "button",
        { class: "candidate", type: "button", dataset: { imageId: candidate.image_id } },
        el("img", {
          src: await imageUrl(store.get(), candidate.url),
          alt: `version ${candidate.position + 1}`,
          width: 128,
          height: 128,
        }),
      );
      button.addEventListener("click", () => choose(candidate, button));
      return button;
    }

    async function choose(candidate, button) {
      buy.disabled = true; // until the click is accepted, so a purchase is always of the candidate last clicked
      try {
        await call(store.get(), "POST", "/events", {
          kind: "click",
          design_id: served.design_id,
          impression_id: served.impression_id,
          image_id: candidate.image_id,
        });
        for (const other of grid.children) {
          other.classList.toggle("chosen", other === button);
        }
        chosen = candidate;
        buy.disabled = false;
        result.textContent = `version ${candidate.position + 1} chosen`;
        clearError(errorBox);
      } catch (error) {
        buy.disabled = chosen === null;
        showError(errorBox, error);
      }
    }

    async function checkOut() {
      buy.disabled = true;
      try {
        const order = await call(store.get(), "POST", "/shop/checkout", {
          impression_id: served.impression_id,
          design_id: served.design_id,
          image_id: chosen.image_id,
          quantity: Number(quantity.value),
        });
        const units = order.quantity === 1 ? "1 unit" : `${order.quantity} units`;
        result.textContent = `Ordered ${units} (order ${order.order_id})`;
        $("orders").append(
          el("li", { dataset: { orderId: order.order_id } }, `${units} of ${design.prompt}, version ${chosen.position + 1}`),
        );
        clearError(errorBox);
      } catch (error) {
        showError(errorBox, error);
      } finally {
        buy.disabled = chosen === null;
      }
    }

    buy.addEventListener("click", checkOut);
    redraw.addEventListener("click", draw);
    return { element, draw };
  }

  async function submitKey(event) {
    event.preventDefault();
    const signedIn = await signIn(store, $("key").value.trim(), "shopper", "a shopper's", errorBox);
    $("key").value = "";
    if (signedIn !== null) {
      await showSignedIn(signedIn);
    }
  }

  $("sign-in-form").addEventListener("submit", submitKey);
  $("sign-out").addEventListener("click", () => {
    store.clear();
    clearError(errorBox);
    showSignedOut();
  });

  (async () => {
    const key = store.get();
    const signedIn = key ? await signIn(store, key, "shopper", "a shopper's", errorBox) : null;
    if (signedIn !== null) {
      await showSignedIn(signedIn);
    } else {
      showSignedOut();
    }
  })();
})();
