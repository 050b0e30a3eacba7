//! Which categories stand in for one another when a shop has none of a garment's own: a
//! shopper who photographs a skirt may take a dress, never a shoe. The table is over the
//! street taxonomy (`street2shop-ccp/taxonomy.json`); a category it does not name has no
//! substitute.

/// Substitutes of `category`, closest first.
pub fn substitutes(category: &str) -> &'static [&'static str] {
    match category {
        "top" => &["outer", "dress"],
        "outer" => &["top"],
        "dress" => &["skirt", "top"],
        "skirt" => &["dress", "shorts"],
        "pants" => &["shorts"],
        "shorts" => &["pants", "skirt"],
        "footwear" => &["boots"],
        "boots" => &["footwear"],
        "scarf & tie" => &["headwear"],
        _ => &[],
    }
}

/// How the category a search ranks first relates to the garment's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    /// The garment's own category.
    Same,
    /// A substitute: the shop has none of the garment's own.
    Substitute,
}

impl Preference {
    pub fn as_str(self) -> &'static str {
        match self {
            Preference::Same => "same",
            Preference::Substitute => "substitute",
        }
    }
}

/// The category whose items a search for a garment of `category` ranks first: its own when
/// the shop has it (`present`), else its closest substitute the shop has, else none.
pub fn preferred_category(category: &str, present: impl Fn(&str) -> bool) -> Option<(&str, Preference)> {
    if present(category) {
        return Some((category, Preference::Same));
    }
    substitutes(category).iter().copied().find(|c| present(c)).map(|c| (c, Preference::Substitute))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_category_first_then_a_substitute_never_an_unrelated_one() {
        let shop = ["dress", "top", "pants"];
        let present = |c: &str| shop.contains(&c);
        assert_eq!(preferred_category("top", present), Some(("top", Preference::Same)));
        assert_eq!(preferred_category("skirt", present), Some(("dress", Preference::Substitute)));
        assert_eq!(preferred_category("shorts", present), Some(("pants", Preference::Substitute)));
        assert_eq!(preferred_category("footwear", present), None);
        assert_eq!(preferred_category("bag", present), None);
    }
}
