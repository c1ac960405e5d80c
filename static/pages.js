// The account pages' one nicety: times as the reader's local time (the server sends unix seconds).
"use strict";
for (const element of document.querySelectorAll("time[data-t]")) {
  const at = new Date(Number(element.dataset.t) * 1000);
  element.dateTime = at.toISOString();
  element.textContent = at.toLocaleString();
}

// Copy buttons: the text of the element a button names, to the clipboard (or selected, where the
// page is not served over HTTPS or from localhost and the clipboard is out of reach).
for (const button of document.querySelectorAll("button[data-copy]")) {
  button.addEventListener("click", async () => {
    const source = document.getElementById(button.dataset.copy);
    try {
      await navigator.clipboard.writeText(source.textContent);
      button.textContent = "Copied";
    } catch {
      const range = document.createRange();
      range.selectNodeContents(source);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
  });
}

// The Devices page opened at localhost: the admin types the address PCs reach, and the install
// commands follow it. Only characters no shell and no PowerShell string treats specially are taken,
// so putting the address in place of the page's own needs no quoting.
const address = document.getElementById("install-address");
if (address) {
  const base = address.dataset.base;
  const commands = [...document.querySelectorAll("code[id^='install-']")].map(code => [code, code.textContent]);
  const ADDRESS = /^https?:\/\/[A-Za-z0-9.-]+(:[0-9]{1,5})?(\/[A-Za-z0-9._\/-]*)?$/;
  address.addEventListener("input", () => {
    const typed = address.value.trim().replace(/\/+$/, "");
    const ok = ADDRESS.test(typed);
    address.setCustomValidity(ok ? "" : "http:// or https://, a host name or IPv4 address, a port, a path");
    address.reportValidity();
    for (const [code, text] of commands) code.textContent = text.split(base).join(ok ? typed : base);
  });
}
