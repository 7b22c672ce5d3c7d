// What the studio and the storefront share: the signed-in key (kept in this tab's sessionStorage only), calls to
// the service's API with it, images fetched with it, problem details as readable text, and building elements
// from text (never from HTML, so nothing a user typed can become markup).
"use strict";

const PerFusion = (() => {
  // Generation answers 503 with Retry-After while its queue is full, and 429 with Retry-After when this key's
  // principal is over its rate limit; a page waits as long as it says and asks again this often.
  const BUSY_RETRIES = 5;

  class ApiError extends Error {
    constructor(status, problem) {
      super(`${status} ${problem.title || "error"}: ${problem.detail || ""}`.trim());
      this.status = status;
      this.problem = problem;
    }
  }

  function keyStore(storageName) {
    return {
      get: () => sessionStorage.getItem(storageName),
      set: (key) => sessionStorage.setItem(storageName, key),
      clear: () => sessionStorage.removeItem(storageName),
    };
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function problemOf(response) {
    try {
      return await response.json();
    } catch (_) {
      return { title: response.statusText || "error", detail: `the service answered ${response.status}` };
    }
  }

  async function call(key, method, path, body) {
    const headers = { Authorization: `Bearer ${key}` };
    const init = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    for (let attempt = 0; ; attempt += 1) {
      const response = await fetch(path, init);
      if (response.ok) {
        return response.json();
      }
      const retryAfter = Number(response.headers.get("Retry-After"));
      if ((response.status === 503 || response.status === 429) && retryAfter > 0 && attempt < BUSY_RETRIES) {
        await sleep(retryAfter * 1000);
        continue;
      }
      throw new ApiError(response.status, await problemOf(response));
    }
  }

  // An <img> cannot send the Authorization header, so images are fetched here and shown as blob: URLs.
  async function imageUrl(key, url) {
    const response = await fetch(url, { headers: { Authorization: `Bearer ${key}` } });
    if (!response.ok) {
      throw new ApiError(response.status, await problemOf(response));
    }
    return URL.createObjectURL(await response.blob());
  }

  function el(tag, attributes, ...children) {
    const element = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === false || value === null || value === undefined) {
        continue;
      }
      if (name === "dataset") {
        Object.assign(element.dataset, value);
      } else if (name.startsWith("on")) {
        element.addEventListener(name.slice(2), value);
      } else {
        element.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      element.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return element;
  }

  function describe(error) {
    return error instanceof ApiError ? error.message : `the page could not reach the service (${error.message})`;
  }

  function showError(element, error) {
    element.textContent = typeof error === "string" ? error : describe(error);
    element.hidden = false;
  }

  function clearError(element) {
    element.textContent = "";
    element.hidden = true;
  }

  // Signs in with the key typed into `form`'s input, if it is a key of `role` (GET /whoami says whose it is), and
  // keeps it for this tab. Resolves to the caller ({role, principal}) or null when the key was refused.
  async function signIn(store, key, role, roleText, errorElement) {
    try {
      const caller = await call(key, "GET", "/whoami");
      if (caller.role !== role) {
        showError(
          errorElement,
          `This is the key of ${caller.role.replace("_", " ")} '${caller.principal}'; sign in with ${roleText} key ` +
            `(perfusion keys create --role ${role} --principal ID).`,
        );
        return null;
      }
      store.set(key);
      clearError(errorElement);
      return caller;
    } catch (error) {
      store.clear();
      showError(errorElement, error);
      return null;
    }
  }

  return { ApiError, keyStore, call, imageUrl, el, describe, showError, clearError, signIn, sleep };
})();
