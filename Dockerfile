# The collector image: no torch (the server never imports it).
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY client_hooks ./client_hooks
COPY server ./server
COPY dashboards ./dashboards
COPY migrations ./migrations
# --no-deps: the client's torch dependency is not needed by the collector; the
# server extra's requirements are read from pyproject.toml so they are listed once.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir $(python -c "import tomllib; \
    print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['server']))")
EXPOSE 8000
CMD ["gradsentry", "serve", "--host", "0.0.0.0", "--port", "8000"]
