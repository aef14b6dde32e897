"""The page, in a real browser: headless Chromium (Debian's) driven by Selenium against uvicorn.

Uses the system browser and driver only (no download); a run without them skips with the reason,
and ``.ci/run`` installs them and makes this test mandatory.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import HALFRES_PNG, SMALL_DICOM, require_tool
from tests.test_uvicorn import running_service

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def years_months(months: float) -> str:
    y = int(months // 12)
    m = round(months - 12 * y)
    if m == 12:
        y, m = y + 1, 0
    return f"{y} y {m} mo ({months:.1f} months)"


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium", "chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1024,1200"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=require_tool("chromedriver", "chromium-driver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory, bundled_model):
    """One service for the page's tests: each test drives its own browser, none reads the service's state."""
    with running_service(tmp_path_factory.mktemp("site"), model_path=bundled_model) as (url, _, _):
        yield url


def upload(browser, url: str, path: Path, sex: str = "", age_years: str = "") -> None:
    browser.get(url + "/")
    browser.find_element(By.ID, "image").send_keys(str(path.resolve()))
    Select(browser.find_element(By.ID, "sex")).select_by_value(sex)
    if age_years:
        browser.find_element(By.ID, "age-years").send_keys(age_years)
    browser.find_element(By.ID, "submit").click()


def wait_for(browser, condition, timeout: float = 60):
    return WebDriverWait(browser, timeout).until(lambda b: condition(b))


def shown(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def test_a_radiograph_shows_the_apis_bone_age_the_chart_and_the_heatmap(browser, site, tmp_path):
    api = httpx.post(
        f"{site}/v1/bone-age",
        files={"image": (HALFRES_PNG.name, HALFRES_PNG.read_bytes())},
        data={"sex": "female", "chronological_age_months": "36"},
        timeout=60,
    ).json()
    upload(browser, site, HALFRES_PNG, sex="female", age_years="3")
    wait_for(browser, lambda b: shown(b, "bone-age"))
    assert shown(browser, "bone-age") == years_months(api["bone_age_months"])
    assert shown(browser, "classification") == api["assessment"]["classification"]
    assert api["assessment"]["statement"] in shown(browser, "statement")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart polygon[data-role=band]")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart circle[data-role=child]")
    # The heatmap arrives from /v1/bone-age/explain and renders as a real image.
    wait_for(browser, lambda b: b.execute_script("return document.getElementById('overlay').naturalWidth") > 0)
    assert browser.find_element(By.ID, "overlay").is_displayed()
    browser.find_element(By.ID, "show-heatmap").click()  # the toggle hides it
    assert not browser.find_element(By.ID, "overlay").is_displayed()
    browser.save_screenshot(str(tmp_path / "radiograph.png"))
    # Printed, the report fits one A4 page (the form and buttons are left out).
    pdf = base64.b64decode(browser.print_page())
    (tmp_path / "report.pdf").write_bytes(pdf)
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf)) == 1


def test_a_dicom_fills_sex_and_age_from_its_header(browser, site, tmp_path):
    upload(browser, site, SMALL_DICOM)
    wait_for(browser, lambda b: shown(b, "bone-age"))
    assert Select(browser.find_element(By.ID, "sex")).first_selected_option.get_attribute("value") == "female"
    assert shown(browser, "sex-source") == "from the DICOM"
    assert browser.find_element(By.ID, "age-years").get_attribute("value") == "7"
    assert browser.find_element(By.ID, "sr").is_displayed()
    browser.save_screenshot(str(tmp_path / "dicom.png"))


def test_the_next_file_does_not_inherit_sex_and_age_filled_from_the_previous_dicom(browser, site):
    upload(browser, site, SMALL_DICOM)
    wait_for(browser, lambda b: shown(b, "bone-age"))
    assert Select(browser.find_element(By.ID, "sex")).first_selected_option.get_attribute("value") == "female"
    # Another patient's PNG: the DICOM's sex and age are cleared, so the service asks for the sex.
    browser.find_element(By.ID, "image").send_keys(str(HALFRES_PNG.resolve()))
    assert Select(browser.find_element(By.ID, "sex")).first_selected_option.get_attribute("value") == ""
    assert browser.find_element(By.ID, "age-years").get_attribute("value") == ""
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, lambda b: b.find_element(By.ID, "error").is_displayed())
    assert "sex is required" in shown(browser, "error")


def test_a_refused_image_shows_its_message_in_plain_words(browser, site, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    upload(browser, site, photo, sex="male")
    wait_for(browser, lambda b: b.find_element(By.ID, "error").is_displayed())
    assert shown(browser, "error").startswith("This image was refused:")
    assert not browser.find_element(By.ID, "result").is_displayed()
    browser.save_screenshot(str(tmp_path / "refused.png"))


def test_the_page_needs_nothing_from_outside_the_service(site):
    page = httpx.get(site + "/").text
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
