-- A link's connections are listed newest first (the landing page of a used link, the dashboard's
-- link page, the API's `link_id` filter). Keyed by the link and then the id, the index returns
-- them in that order, so a page reads its own rows only instead of all of the link's
-- connections and a sort.
DROP INDEX connections_link_id;
CREATE INDEX connections_link_id ON connections (link_id, id);
